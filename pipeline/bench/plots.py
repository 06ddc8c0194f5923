"""The scaling figure of `lossaverse bench` (bench_scaling.png): each stage's rate against its
replicas, workers or rows, beside the ideal line."""

from __future__ import annotations

import textwrap
from pathlib import Path


def _panel(ax, title: str, xlabel: str, ylabel: str, points: list[tuple[int, float]], ideal: str,
           extra: list[tuple[str, list[tuple[int, float]], str]] = (), label: str = "measured") -> None:
    """One stage: measured throughput against scale, the ideal line through the smallest scale
    (linear in replicas or workers; a constant rate over rows, on log axes as rates differ ~100x)."""
    from matplotlib.ticker import FuncFormatter  # deferred: matplotlib loads in seconds

    points = sorted(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.plot(xs, ys, "o-", color="C0", label=label, zorder=3)
    if ideal == "linear":
        ax.plot(xs, [ys[0] * x / xs[0] for x in xs], "--", color="grey", label="ideal (linear)")
        ax.set_xticks(xs)
    else:
        ax.plot(xs, [ys[0]] * len(xs), "--", color="grey", label="ideal (constant rate)")
        ax.set_xscale("log")
        ax.set_yscale("log")
    for x, y in points:
        ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    every = list(points)
    for i, (name, pts, style) in enumerate(extra):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i + 1}", markersize=8, label=name, zorder=2)
        below = (-3 if ideal == "linear" else -14) - 10 * i
        for x, y in pts:  # left of the point (measured values are right of theirs), one line per series
            ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(-7, below), fontsize=8,
                        color=f"C{i + 1}", ha="right")
        every += pts
    top = max(max(ys), *(y for _, y in every))
    if ideal == "linear":
        ax.set_ylim(0, max(top, ys[0] * xs[-1] / xs[0]) * 1.12)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    else:
        ax.set_ylim(min(y for _, y in every) / 3, top * 3)
    if ideal == "linear":  # room left of the smallest scale for the baselines' values
        ax.set_xlim(xs[0] - 0.3 * max(1, xs[-1] - xs[0]) / 2, xs[-1] + 0.08 * max(1, xs[-1] - xs[0]))
    else:
        ax.set_xlim(xs[0] / 1.8, xs[-1] * 1.6)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="center" if ideal != "linear" else "upper left")
    ax.grid(alpha=0.3)


def plot_scaling(result: dict, path: Path) -> None:
    """Throughput against scale per stage, with the ideal line through the smallest scale and the
    stage's baseline where there is one. A generate point without a steady-state figure is left out."""
    import matplotlib  # deferred: matplotlib loads in seconds

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib loads in seconds

    panels = []
    if "generate" in result:
        g = result["generate"]
        pts = [(int(k), v["steady_tokens_per_s"]["median"]) for k, v in g["replicas"].items() if v["steady_tokens_per_s"]]
        if pts:
            base = [(1, g["baseline"]["steady_tokens_per_s"]["median"])]
            ratio = f"; {g['ratio_steady']:.2f} x vLLM" if g.get("ratio_steady") else ""
            panels.append((f"generate: steady tokens/s{ratio}", "engine replicas", "tokens/s (steady state)", pts, "linear",
                           [("vLLM LLM.generate, 1 engine", base, "s")], "the generate stage"))
        else:  # nothing measured: say so rather than leave the stage out
            note = next(v["steady_note"] for v in g["replicas"].values() if v["steady_note"])
            panels.append(("generate: steady tokens/s not measured", note))
    if "train" in result and result["train"].get("workers"):
        t = result["train"]
        w = t["workers"]
        zero2 = [(int(k), v["zero2_samples_per_s"]["median"]) for k, v in w.items() if v["zero2_samples_per_s"]["median"]]
        extra = [("TRL trainer direct, 1 process", [(1, t["baseline"]["samples_per_s"]["median"])], "s")]
        if zero2:
            extra.append(("Ray Train, ZeRO-2", sorted(zero2), "^:"))
        panels.append((f"train: samples/s; 1 worker {t['ratio']:.2f} x TRL direct", "Ray Train workers", "samples/s",
                       [(int(k), v["samples_per_s"]["median"]) for k, v in w.items()], "linear", extra, "Ray Train, DDP"))
    if "mark" in result:
        m = result["mark"]["rows"]
        panels.append(("mark: numeric rows/s on one core", "rows marked", "rows/s (log)",
                       [(int(k), v["kinds"]["numeric"]["rows_per_s"]["median"]) for k, v in m.items()], "constant",
                       [("math-verify parse + verify",
                         sorted((int(k), v["baseline"]["rows_per_s"]["median"]) for k, v in m.items()), "s:")],
                       "the marker's rules"))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if len(panel) == 2:
            ax.set_title(panel[0], fontsize=11)
            ax.text(0.5, 0.5, textwrap.fill(panel[1], 40), ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        else:
            _panel(ax, *panel)
    info = result.get("machine", {})
    gpus = f"{len(info['gpus'])} GPU(s)" if info.get("gpus") else "no GPU"
    load = f", load average {info['load_average'][0]:.1f} at start" if info.get("load_average") else ""
    if result.get("load_average_end"):
        load += f", {result['load_average_end'][0]:.1f} at end"
    fig.suptitle(f"lossaverse bench: {info.get('cpus', '?')} CPUs, {gpus}{load}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
