"""Evaluation statistics: accuracy per model with its uncertainty, and paired comparisons on the same items.

Input: marked eval rows (the `marked` contract, lossaverse.pipeline.data.schemas.MARKED); only `id`, `competitor`
(the evaluated model's name), `model`, `correct` and `reason` are read. Several samples per item
are averaged per item first: the item is the unit of resampling, because the answers to one item
are not independent.

Output of `evaluation_results` (written as eval/results.json):

    {<name>: {"model", "accuracy", "correct", "answers", "items", "samples_per_item",
              "ci95": [low, high], "reasons": {reason: count}},
     "pairs": [{"model", "baseline", "items", "diff", "ci95": [low, high],
                "model_better", "baseline_better", "ties", "mcnemar_p"}],
     "statistics": {"ci", "test", "n_boot", "seed"}}

- accuracy: the mean over items of the per-item share of right answers (equal to correct/answers
  when every item has the same number of samples), with the 95% percentile bootstrap interval over
  items (lossaverse.pipeline.data.stats.bootstrap_ci).
- diff: accuracy(model) - accuracy(baseline) on the items both answered, with the paired bootstrap
  interval (items resampled together, lossaverse.pipeline.data.stats.paired_bootstrap_diff).
- mcnemar_p: McNemar's exact test (lossaverse.pipeline.data.stats.mcnemar_exact) on the discordant items: b = items
  where the model scores higher, c = items where the baseline does. With one sample per item these
  are exactly McNemar's "only the model right" / "only the baseline right" counts; with several,
  it is the exact sign test on per-item differences (of which McNemar's exact test is the binary case).

Every number is deterministic given `seed`: items are sorted by id before resampling, so the row
order the marking stage happened to write does not matter.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa

from lossaverse.pipeline.data.schemas import REASONS
from lossaverse.pipeline.data.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap_diff

N_BOOT = 2000
# The `split` of a transfer benchmark's items in eval/answers and eval/marked (scored apart), and
# the folder of its results: eval/transfer/results.json.
TRANSFER = "transfer"
NEEDED = ("id", "competitor", "model", "correct", "reason")


def item_scores(marked: pa.Table) -> dict[str, dict[str, float]]:
    """{name: {item id: share of that item's answers marked right}}; a null verdict counts as wrong."""
    missing = [c for c in NEEDED if c not in marked.column_names]
    if missing:
        raise ValueError(f"marked eval rows: missing column(s) {missing}; has {marked.column_names}")
    right: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for name, item, ok in zip(marked["competitor"].to_pylist(), marked["id"].to_pylist(), marked["correct"].to_pylist()):
        right[name][item].append(bool(ok))
    return {name: {item: sum(v) / len(v) for item, v in items.items()} for name, items in right.items()}


def model_accuracy(scores: dict[str, float], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """accuracy (mean of per-item scores), items, and the 95% bootstrap CI over items.

    Worked by hand: scores {a: 1, b: 1, c: 1} -> accuracy 1.0, every resample has mean 1, so the
    interval is the point [1.0, 1.0].
    """
    if not scores:
        raise ValueError("model_accuracy needs at least one item")
    values = [scores[k] for k in sorted(scores)]
    lo, hi = bootstrap_ci(values, n_boot, seed)
    return {"accuracy": sum(values) / len(values), "items": len(values), "ci95": [lo, hi]}


def compare(model: dict[str, float], baseline: dict[str, float], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The paired comparison of two models' per-item scores on the items both answered.

    Worked by hand: 10 items, the model right on 9 the baseline got wrong and the baseline right on 1
    the model got wrong -> b=9, c=1, p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024 = 0.021484375, and
    diff = (9 - 1)/10 = 0.8.
    """
    common = sorted(model.keys() & baseline.keys())
    if not common:
        raise ValueError("compare: the two models have no item in common")
    a, b = [model[k] for k in common], [baseline[k] for k in common]
    better = sum(x > y for x, y in zip(a, b))
    worse = sum(x < y for x, y in zip(a, b))
    d = paired_bootstrap_diff(a, b, n_boot, seed)
    return {
        "items": len(common),
        "diff": d["diff"],
        "ci95": [d["low"], d["high"]],
        "model_better": better,
        "baseline_better": worse,
        "ties": len(common) - better - worse,
        "mcnemar_p": mcnemar_exact(better, worse),
    }


def default_order(names) -> list[str]:
    """The untrained model first (its name ends in `-base`), then the rest by name."""
    return sorted(names, key=lambda n: (not n.endswith("-base"), n))


def evaluation_results(marked: pa.Table, order: list[str] | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Marked eval rows -> the eval/results.json document (see the module docstring).

    `order` lists the models as evaluated, baseline first; each pair compares a model with every
    model before it (diff = later - earlier). Default: `default_order`.
    """
    scores = item_scores(marked)
    names = list(order) if order is not None else default_order(scores)
    absent = [n for n in names if n not in scores]
    if absent:
        raise ValueError(f"no marked eval rows for model(s) {absent}; present: {sorted(scores)}")
    names += [n for n in default_order(scores) if n not in names]
    answers, correct, reasons = Counter(), Counter(), defaultdict(Counter)
    model_of: dict[str, str] = {}
    for name, ok, reason, model in zip(marked["competitor"].to_pylist(), marked["correct"].to_pylist(),
                                       marked["reason"].to_pylist(), marked["model"].to_pylist()):
        answers[name] += 1
        correct[name] += bool(ok)
        reasons[name][reason] += 1
        model_of.setdefault(name, model)
    out: dict = {}
    for name in names:
        out[name] = {
            "model": model_of[name],
            "answers": answers[name],
            "correct": correct[name],
            "samples_per_item": answers[name] / len(scores[name]),
            "reasons": {r: reasons[name].get(r, 0) for r in (*REASONS, *sorted(set(reasons[name]) - set(REASONS)))},
            **model_accuracy(scores[name], n_boot, seed),
        }
    out["order"] = names
    out["pairs"] = [
        {"model": later, "baseline": earlier, **compare(scores[later], scores[earlier], n_boot, seed)}
        for i, later in enumerate(names) for earlier in names[:i]
        if scores[later].keys() & scores[earlier].keys()
    ]
    out["statistics"] = {
        "ci": "95% percentile bootstrap over items (samples averaged per item first)",
        "test": "McNemar's exact test on discordant items (exact sign test on per-item scores)",
        "n_boot": n_boot,
        "seed": seed,
    }
    return out


def models_of(results: dict) -> dict[str, dict]:
    """The per-model entries of a results document (not `pairs`, `rounds`, `statistics`), in the
    order they were evaluated (`order`; results.json is written with sorted keys)."""
    models = {k: v for k, v in results.items() if isinstance(v, dict) and "accuracy" in v}
    order = [n for n in results.get("order") or [] if n in models]
    return {**{n: models[n] for n in order}, **{k: v for k, v in models.items() if k not in order}}


def pair_of(results: dict, model: str, baseline: str) -> dict | None:
    """`model` − `baseline` from results.json's pairs (each stored once, the later-evaluated model
    first): the stored pair, or the reverse one turned round; None where either was not evaluated."""
    for p in results.get("pairs") or []:
        if (p["model"], p["baseline"]) == (model, baseline):
            return p
        if (p["model"], p["baseline"]) == (baseline, model):
            flipped = {**p, "model": model, "baseline": baseline, "diff": -p["diff"], "ci95": [-p["ci95"][1], -p["ci95"][0]]}
            if "model_better" in p:
                flipped.update(model_better=p["baseline_better"], baseline_better=p["model_better"])
            return flipped
    return None


def wrong_answers_pair(results: dict) -> dict | None:
    """The recipe against RFT (`target-kto` - `target-rft`: the same SFT start, the same on-policy
    samples and steps, RFT without the wrong answers): what the wrong answers added, or None
    where no RFT baseline was evaluated."""
    return pair_of(results, "target-kto", "target-rft")


def model_label(name: str) -> str:
    """A reader's name for an evaluated model: target-base -> "target before training",
    target-kto -> "target after KTO"; any other name as it is."""
    if name == "target-base":
        return "target before training"
    if name == "target-recipe-sft":  # lossaverse.cluster.evaluate.RECIPE_SFT
        return "target after the recipe's SFT step"
    if name.startswith("target-"):
        return f"target after {name[len('target-'):].upper()}"
    return name


BETTER, WORSE, SAME = "▲", "▼", "="  # the summary table's verdict marks


def verdict_mark(pair: dict, alpha: float = 0.05) -> str:
    """▲ / ▼ where the 95% CI excludes zero and McNemar's exact test agrees (p < alpha), else =."""
    lo, hi = pair["ci95"]
    if pair["mcnemar_p"] < alpha and (lo > 0 or hi < 0):
        return BETTER if lo > 0 else WORSE
    return SAME


def _pt(x: float, sign: str = "") -> str:
    """A share in points, one decimal, never "-0.0"."""
    return f"{round(100 * x, 1) + 0.0:{sign}.1f}"


def accuracy_cell(accuracy: float, ci=None) -> str:
    """"74.0 [70.0,78.0]": an accuracy in points with its 95% CI, as the summary tables print it."""
    return _pt(accuracy) + (f" [{_pt(ci[0])},{_pt(ci[1])}]" if ci else "")


def delta_cell(pair: dict | None) -> str:
    """"+1.8 [-1.2,4.8]=": a paired difference in points, its 95% CI and its verdict mark (none for
    a pair stored without its McNemar p, as tune.json kept earlier trials)."""
    if pair is None:
        return ""
    mark = verdict_mark(pair) if "mcnemar_p" in pair else ""
    return f"{_pt(pair['diff'], '+')} [{_pt(pair['ci95'][0])},{_pt(pair['ci95'][1])}]{mark}"


def model_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The one-row-per-model table that heads the console summary and report.md (lm-eval's shape):
    model, accuracy [95% CI] in %, items, then the paired difference in points [95% CI] and its mark
    against the untrained target, SFT and RFT (those evaluated): each row minus a baseline evaluated
    before it (the stored pairs), blank against itself and the baselines after it."""
    models = models_of(results)
    baselines = [(b, label) for b, label in (("target-base", "Δ untrained"), ("target-sft", "Δ SFT"), ("target-rft", "Δ RFT"))
                 if b in models]
    header = ["model", "accuracy [95% CI]", "items", *[label for _, label in baselines]]
    rows = []
    for name, r in models.items():
        row = [name.removeprefix("target-"), accuracy_cell(r["accuracy"], r.get("ci95")),
               str(r.get("items", r.get("answers", "")))]
        for baseline, _ in baselines:
            stored = next((p for p in results.get("pairs") or [] if (p["model"], p["baseline"]) == (name, baseline)), None)
            row.append(delta_cell(stored))  # only a baseline evaluated before the row
        rows.append(row)
    return header, rows
