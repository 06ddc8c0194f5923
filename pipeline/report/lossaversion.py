"""Loss aversion, visible: KTO's value function with the measured implied rewards, the accuracy of
a lambda_U / lambda_D sweep, and the ablation table of a tune run, for the report.

KTO (Ethayarajh et al., ICML 2024, Eq. 8) values an output y of x by how far its implied reward
r(x, y) = log pi(y|x) / pi_ref(y|x) lies from the reference point z0 (TRL's KL estimate, clamped
at 0). Centred at the reference point, as Kahneman and Tversky draw a value function, with
z = r - z0:

    v(z) = lambda_D * (sigmoid(beta z) - 1/2)   z >= 0   (gains: concave)
    v(z) = lambda_U * (sigmoid(beta z) - 1/2)   z <  0   (losses: convex)

The slopes at the reference point are lambda_D beta / 4 and lambda_U beta / 4, so the curve is
steeper over losses exactly when lambda_U > lambda_D (loss aversion lambda_U / lambda_D > 1). The
measured points are the training log's mean implied rewards per logged step: desirable rows at
z = rewards/chosen / beta - kl, undesirable rows at z = rewards/rejected / beta - kl.
"""

from __future__ import annotations

import math
from pathlib import Path

from lossaverse.pipeline.data.rundir import read_json
from lossaverse.pipeline.report.plots import figure, save


def value(z: float, beta: float, lambda_d: float, lambda_u: float) -> float:
    """v(z) of the module docstring. Worked by hand: beta 1, z = 0 -> 0; z -> +inf -> lambda_D / 2;
    z -> -inf -> -lambda_U / 2."""
    weight = lambda_d if z >= 0 else lambda_u
    return weight * (1 / (1 + math.exp(-beta * z)) - 0.5)


def implied_rewards(metrics: list[dict], beta: float) -> dict[str, list[tuple[int, float]]]:
    """{"desirable": [(step, z)], "undesirable": [(step, z)]} from KTO's per-step training log."""
    out: dict[str, list[tuple[int, float]]] = {"desirable": [], "undesirable": []}
    for m in metrics:
        kl = m.get("kl", 0.0) if isinstance(m.get("kl"), (int, float)) else 0.0
        for key, label in (("rewards/chosen", "desirable"), ("rewards/rejected", "undesirable")):
            if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]):
                out[label].append((int(m.get("step", 0)), m[key] / beta - kl))
    return out


def plot_value_function(beta: float, lambda_d: float, lambda_u: float, metrics: list[dict], path: Path) -> str:
    points = implied_rewards(metrics, beta)
    zs = [z for pts in points.values() for _, z in pts]
    span = max([6 / beta] + [abs(z) * 1.15 for z in zs])
    grid = [span * (i / 200 - 1) for i in range(401)]
    fig = figure(7, 4.2)
    ax = fig.add_subplot()
    ax.plot(grid, [value(z, beta, lambda_d, lambda_u) for z in grid], color="#264653", lw=2,
            label=f"v(z): beta {beta:g}, lambda_D {lambda_d:g}, lambda_U {lambda_u:g}")
    ax.axhline(0, color="#999", lw=0.8)
    ax.axvline(0, color="#999", lw=0.8)
    for label, colour in (("desirable", "#2a9d8f"), ("undesirable", "#e76f51")):
        pts = points[label]
        if pts:
            steps = [s for s, _ in pts]
            ax.scatter([z for _, z in pts], [value(z, beta, lambda_d, lambda_u) for _, z in pts], s=12, c=steps,
                       cmap="Greens" if label == "desirable" else "Oranges", edgecolors=colour, linewidths=0.4,
                       label=f"{label} rows, mean implied reward per logged step (darker: later)")
    ax.set_xlabel("implied reward relative to the reference point, z = log(pi/pi_ref) - z0")
    ax.set_ylabel("value v(z)")
    ax.set_title(f"KTO value function (loss aversion lambda_U/lambda_D = {lambda_u / lambda_d:.3g})")
    ax.legend(fontsize=7, loc="upper left")
    return save(fig, path)


def sweep(tune: dict) -> list[dict]:
    """The KTO trials of a tune.json that record their loss aversion, by lambda_U / lambda_D."""
    rows = [t for t in tune.get("trials", []) if isinstance(t.get("loss_aversion"), (int, float))]
    return sorted(rows, key=lambda t: t["loss_aversion"])


def plot_sweep(tune: dict, path: Path) -> str | None:
    """Validation accuracy (95% CI) against lambda_U / lambda_D, one line per other setting."""
    rows = sweep(tune)
    if len({t["loss_aversion"] for t in rows}) < 2:
        return None
    groups: dict[str, list[dict]] = {}
    for t in rows:
        rest = [s for s in t["set"] if not s.split("=")[0].endswith(("undesirable_weight", "desirable_weight", "loss_aversion"))]
        groups.setdefault(" ".join(rest) or "trials", []).append(t)
    fig = figure(7, 4)
    ax = fig.add_subplot()
    for name, ts in groups.items():
        xs = [t["loss_aversion"] for t in ts]
        ys = [t["validation_accuracy"] for t in ts]
        err = [[y - t["ci95"][0] for y, t in zip(ys, ts)], [t["ci95"][1] - y for y, t in zip(ys, ts)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name[:70])
    base = rows[0].get("base_accuracy")
    if isinstance(base, (int, float)):
        ax.axhline(base, color="#999", ls="--", lw=1, label="untrained target")
    for b in tune.get("baselines", []):
        ax.axhline(b["validation_accuracy"], color="#457b9d", ls=":", lw=1.2, label=f"{b['method']} at the same budget")
    ax.set_xscale("log")
    ax.set_xlabel("loss aversion lambda_U / lambda_D (log scale)")
    ax.set_ylabel(f"validation accuracy ({tune.get('items')} items)")
    ax.set_title("KTO accuracy against loss aversion (lossaverse tune, validation items)")
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_sft_curve(tune: dict, path: Path) -> str | None:
    """SFT's validation accuracy (95% CI) after each exported step of its run, the step where it
    stopped gaining and the step the recipe's KTO starts from (tune.json's `sft_curve`)."""
    curve = tune.get("sft_curve") or {}
    points = curve.get("points") or []
    if len(points) < 2:
        return None
    fig = figure(7, 4)
    ax = fig.add_subplot()
    xs, ys = [p["step"] for p in points], [p["accuracy"] for p in points]
    err = [[y - p["ci95"][0] for y, p in zip(ys, points)], [p["ci95"][1] - y for y, p in zip(ys, points)]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color="#1d3557", label="SFT run, after each step")
    if curve.get("stopped_gaining_at") is not None:
        ax.axvline(curve["stopped_gaining_at"], color="#2a9d8f", ls="--", lw=1.2, label="SFT stopped gaining (validation)")
    ax.axvline(curve["sft_steps"], color="#e76f51", ls=":", lw=1.2, label="the recipe's KTO starts here (sft_steps)")
    base = next((t.get("base_accuracy") for t in tune.get("trials", []) if isinstance(t.get("base_accuracy"), (int, float))), None)
    if base is not None:
        ax.axhline(base, color="#999", ls="--", lw=1, label="untrained target")
    ax.set_xlabel("SFT optimizer steps")
    ax.set_ylabel(f"validation accuracy ({tune.get('items')} items)")
    ax.set_title("SFT's validation curve (lossaverse tune, validation items)")
    ax.legend(fontsize=7)
    return save(fig, path)


def sft_curve_lines(tune: dict) -> list[str]:
    """The curve as a markdown table and the step where SFT stopped gaining."""
    curve = tune.get("sft_curve") or {}
    points = curve.get("points") or []
    if not points:
        return []
    lines = ["| SFT steps | validation accuracy [95% CI] | vs the step before, points [95% CI] |", "|---:|---:|---:|"]
    for p in points:
        lo, hi = p["ci95"]
        v = p.get("vs_previous")
        lines.append(f"| {p['step']} | {100 * p['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     + (f"{_pts(v['diff'])} {_ci(v['ci95'])}" if v else "") + " |")
    stopped = curve.get("stopped_gaining_at")
    lines += ["", f"SFT stopped gaining at step {stopped} ({curve['rule']}); the recipe's KTO starts at step "
                  f"{curve['sft_steps']} (`train.sft_steps`)."]
    return lines


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _ci(ci) -> str:
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def ablation_lines(tune: dict) -> list[str]:
    """A markdown table of every tune trial: its settings, validation accuracy, and its paired
    difference (points, 95% CI) against the untrained target and against each baseline."""
    trials = tune.get("trials", [])
    if not trials:
        return []
    base_names = [b["method"] for b in tune.get("baselines", [])]
    head = "| trial | steps | validation accuracy [95% CI] | vs untrained, points [95% CI] |" + \
           "".join(f" vs {m} at the same budget [95% CI] |" for m in base_names)
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(base_names)]
    for t in tune.get("baselines", []) + trials:
        lo, hi = t["ci95"]
        baseline = t["trial"].startswith("baseline-")
        cells = [f"baseline: {t['method']}" if baseline else " ".join(t["set"]) or "the config as it is",
                 str(t.get("steps", "")), f"{100 * t['validation_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]",
                 f"{_pts(t['gain'])} {_ci(t['gain_ci95'])}"]
        for m in base_names:
            v = (t.get("vs") or {}).get(m)
            cells.append(f"{_pts(v['diff'])} {_ci(v['ci95'])}" if v else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def kto_settings(files) -> tuple[float, float, float] | None:
    """(beta, lambda_D, lambda_U) the run's KTO was trained with, from its manifest; None if it
    trained no KTO."""
    cfg = files.manifest.get("config", {})
    train = cfg.get("train", {})
    stage = (read_json((files.source or files.run_dir) / "manifest.json", {}) or {}).get("stages", {}).get("train", {})
    if train.get("method") != "kto" or "desirable_weight" not in stage:
        return None
    return float(train["beta"]), float(stage["desirable_weight"]), float(stage["undesirable_weight"])  # a full config dump


def section(files, plots: dict[str, str], tune: dict | None) -> list[str]:
    """The report's "Loss aversion" section (and the ablation table, when a tune.json exists)."""
    lines: list[str] = []
    settings = kto_settings(files)
    if settings is not None:
        beta, lam_d, lam_u = settings
        points = implied_rewards(files.metrics, beta)
        lines += ["## Loss aversion", "",
                  f"KTO trained with beta {beta:g}, lambda_D {lam_d:g}, lambda_U {lam_u:g}: loss aversion "
                  f"lambda_U/lambda_D = {lam_u / lam_d:.3g} (" + ("steeper over losses" if lam_u > lam_d else
                  "not steeper over losses: the losses weigh less than the gains") + ")."]
        for label, pts in points.items():
            if pts:
                lines.append(f"Mean implied reward of {label} rows, relative to the reference point: "
                             f"{pts[0][1]:+.3f} at step {pts[0][0]}, {pts[-1][1]:+.3f} at step {pts[-1][0]}.")
        if "value_function" in plots:
            lines += ["", f"![KTO value function with the measured implied rewards]({plots['value_function']})"]
        lines.append("")
    if tune and tune.get("trials"):
        lines += [f"## Ablation and tuning ({tune.get('items')} validation items, `lossaverse tune`; the eval split was not read)", ""]
        lines += ablation_lines(tune) + [""]
        if "loss_aversion" in plots:
            lines += [f"![validation accuracy against loss aversion]({plots['loss_aversion']})", ""]
    if tune and (curve := sft_curve_lines(tune)):
        lines += [f"## SFT's validation curve ({tune.get('items')} validation items, `lossaverse tune`)", ""] + curve + [""]
        if "sft_curve" in plots:
            lines += [f"![SFT's validation curve]({plots['sft_curve']})", ""]
    return lines
