"""The run report's plots: accuracy with CIs and paired differences, accuracy per round, the
competitors' labels and wrong-answer reasons, training curves. Matplotlib's object API: no pyplot,
no global backend state. `lossaverse.pipeline.report.report` renders them and writes the markdown around them."""

from __future__ import annotations

import math
from pathlib import Path

from lossaverse.pipeline.report.evalstats import model_label, models_of

GOOD, BAD, NEUTRAL, MODEL = "#2a9d8f", "#e76f51", "#8d99ae", "#457b9d"
REASON_COLOURS = {"mismatch": "#e76f51", "no_answer": "#f4a261", "truncated": "#e9c46a", "error": "#6d597a",
                  "llm_not_equal": "#b56576"}


def _p_is(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def figure(width: float, height: float):
    from matplotlib.figure import Figure  # deferred: matplotlib loads in seconds

    return Figure(figsize=(width, height), layout="constrained")


def save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    return str(path)


def round_entries(rounds: list) -> list[tuple[int, dict[str, dict]]]:
    """[(round number, {name: {"accuracy", "ci95"?}})] from a results `rounds` list, in order."""
    out = []
    for i, r in enumerate(r for r in rounds if isinstance(r, dict)):
        out.append((int(r.get("round", i + 1)), {k: v for k, v in models_of(r).items() if _finite(v["accuracy"])}))
    return out


def plot_accuracy(models: dict[str, dict], pairs: list[dict], path: Path) -> str:
    """Left: eval accuracy per model with its 95% CI. Right (when there are pairs): each paired
    difference with its CI, against the zero line."""
    fig = figure(11 if pairs else 6, max(3.6, 1.2 + 0.5 * len(pairs)) if pairs else 4)
    axes = fig.subplots(1, 2, width_ratios=[1, 1.2]) if pairs else [fig.subplots()]
    ax = axes[0]
    names = list(models)
    acc = [100 * models[n]["accuracy"] for n in names]
    cis = [models[n].get("ci95") or [models[n]["accuracy"]] * 2 for n in names]
    err = [[a - 100 * lo for a, (lo, _) in zip(acc, cis)], [100 * hi - a for a, (_, hi) in zip(acc, cis)]]
    colours = [NEUTRAL if n.endswith("-base") else MODEL for n in names]
    ax.bar(range(len(names)), acc, yerr=err, capsize=6, color=colours, edgecolor="black", linewidth=0.6)
    for i, (a, (lo, hi)) in enumerate(zip(acc, cis)):
        ax.annotate(f"{a:.1f}%\n[{100 * lo:.1f}, {100 * hi:.1f}]", (i, 100 * hi), xytext=(0, 4),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [model_label(n).replace("target ", "target\n") for n in names], fontsize=8)
    top = max(100 * hi for _, hi in cis)
    ax.set_ylim(0, min(100, top * 1.25 + 5))
    ax.set_ylabel("accuracy on the eval split (%)")
    items = sorted({models[n].get("items") for n in names} - {None})
    ax.set_title(f"Accuracy, 95% bootstrap CI ({', '.join(map(str, items))} items)" if items else "Accuracy", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if pairs:
        ax = axes[1]
        for i, p in enumerate(pairs):
            lo, hi = p["ci95"]
            colour = GOOD if lo > 0 else BAD if hi < 0 else NEUTRAL
            ax.errorbar(100 * p["diff"], i, xerr=[[100 * (p["diff"] - lo)], [100 * (hi - p["diff"])]], fmt="o",
                        color=colour, capsize=5, markersize=7)
            ax.annotate(f"{100 * p['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]  {_p_is(p['mcnemar_p'])}",
                        (100 * p["diff"], i), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=8)
        ax.axvline(0, color="black", linewidth=0.8)
        low = min([0.0] + [100 * p["ci95"][0] for p in pairs])
        high = max([0.0] + [100 * p["ci95"][1] for p in pairs])
        pad = max(1.0, 0.12 * (high - low))
        ax.set_xlim(low - pad, high + pad)
        ax.set_yticks(range(len(pairs)), [f"{model_label(p['model'])}\n− {model_label(p['baseline'])}" for p in pairs], fontsize=8)
        ax.set_ylim(-0.7, len(pairs) - 0.3)
        ax.invert_yaxis()
        ax.set_xlabel("difference in accuracy (points), 95% paired bootstrap CI")
        ax.set_title("Paired difference on the same items (McNemar exact p)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def plot_rounds(rounds: list, path: Path) -> str:
    """Accuracy per round of every model or competitor the rounds list, with CIs where given."""
    rows = round_entries(rounds)
    fig = figure(7, 4)
    ax = fig.subplots()
    for name in sorted({n for _, entries in rows for n in entries}):
        pts = [(k, e[name]) for k, e in rows if name in e]
        xs, ys = [k for k, _ in pts], [100 * e["accuracy"] for _, e in pts]
        ci = [e.get("ci95") or [e["accuracy"]] * 2 for _, e in pts]
        err = [[y - 100 * c[0] for y, c in zip(ys, ci)], [100 * c[1] - y for y, c in zip(ys, ci)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=model_label(name))
    ax.set_xticks(sorted({k for k, _ in rows}))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per round (95% CI)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_competitors(labels: dict[str, dict], wrong: dict[str, dict], path: Path) -> str:
    """Left: desirable / undesirable rows per competitor. Right: the reasons for wrong answers."""
    names = sorted(set(labels) | set(wrong))
    fig = figure(11, 2.2 + 0.6 * len(names))
    left, right = fig.subplots(1, 2)
    for i, n in enumerate(names):
        c = labels.get(n, {"desirable": 0, "undesirable": 0})
        total = c["desirable"] + c["undesirable"]
        left.barh(i, c["desirable"], color=GOOD, label="desirable" if i == 0 else None)
        left.barh(i, c["undesirable"], left=c["desirable"], color=BAD, label="undesirable" if i == 0 else None)
        if total:
            left.annotate(f"{c['desirable']} / {c['undesirable']}  ({100 * c['desirable'] / total:.0f}% desirable)",
                          (total, i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    left.set_yticks(range(len(names)), names)
    left.invert_yaxis()
    left.set_xlim(0, max([sum(c.values()) for c in labels.values()] or [1]) * 1.6)
    left.set_xlabel("rows")
    left.set_title("Label balance per competitor", fontsize=10)
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(names)), ncol=2, frameon=False)
    reasons = sorted({r for c in wrong.values() for r in c}, key=lambda r: (r not in REASON_COLOURS, r))
    start = [0] * len(names)
    for r in reasons:
        counts = [wrong.get(n, {}).get(r, 0) for n in names]
        right.barh(range(len(names)), counts, left=start, color=REASON_COLOURS.get(r), label=r)
        start = [s + c for s, c in zip(start, counts)]
    right.set_yticks(range(len(names)), names)
    right.invert_yaxis()
    right.set_xlabel("wrong answers")
    right.set_title("Reasons for wrong answers", fontsize=10)
    if reasons:
        right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(names)), ncol=len(reasons), frameon=False)
    return save(fig, path)


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw curve of a few-example batch is too noisy to read)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(metrics: list[dict], curves: dict[str, dict[str, str]], path: Path) -> str:
    """One panel per group of `curves` that the log holds, against the logged step."""
    panels = {title: keys for title, keys in curves.items() if any(_finite(m.get(k)) for m in metrics for k in keys)}
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = figure(5.5 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes, panels.items()):
        smoothed = False
        for key, label in keys.items():
            pts = [(m.get("step", i + 1), m[key]) for i, m in enumerate(metrics) if _finite(m.get(key))]
            if not pts:
                continue
            xs, ys = [x for x, _ in pts], [y for _, y in pts]
            if len(ys) > 30 and key != "learning_rate":
                line = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)[0]
                ax.plot(xs, _smooth(ys, max(5, len(ys) // 20)), color=line.get_color(), label=label)
                smoothed = True
            else:
                ax.plot(xs, ys, marker="o" if len(ys) < 15 else None, label=label)
        if title == "rewards":
            ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"{title} (faint: per step; solid: moving average)" if smoothed else title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)
