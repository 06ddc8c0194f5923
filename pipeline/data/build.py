"""Alignment datasets from marked answers: `kto`, `negatives`, `pairs` and `stats.json`.

Pure functions over pyarrow tables:
- kto: (prompt, completion, label) per answer with a non-empty completion and no inference error,
  label = the marker's verdict (TRL's unpaired-preference format). Optionally (`reference_rows`),
  for items no competitor answered right, the reference answer stated in the prompt's
  final-answer form as an extra desirable row, tagged competitor `reference`.
- negatives: every wrong marked row, all columns (errors, empty and truncated answers included).
- pairs: (prompt, chosen, rejected) for items with at least one right and one wrong answer,
  matched in (competitor, sample) order, as many pairs as the smaller side has.
- stats: accuracy per competitor with 95% intervals (Wilson; bootstrap over items), counts per
  reason, the agreement table with McNemar's exact test and the paired difference, label balance,
  recommended KTO weights.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from lossaverse.pipeline.data.schemas import ITEMS, KTO, MARKED, NEGATIVES, PAIRS, REASONS, check
from lossaverse.pipeline.data.kinds import kind_of
from lossaverse.pipeline.data.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap_diff, wilson_interval

# KTO paper (Ethayarajh et al., 2024, Sec. 4.2): keep lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
KTO_RATIO_RANGE = (1.0, 4 / 3)


REFERENCE = "reference"  # the competitor name of reference-answer rows in datasets/kto


def reference_rows(marked: pa.Table) -> pa.Table:
    """One desirable kto row per distinct prompt of every item that no answer got right."""
    solved = set(marked.filter(marked["correct"])["id"].to_pylist())
    seen, rows = set(), []
    for row in marked.select(["id", "prompt", "reference", "kind"]).to_pylist():
        if row["id"] in solved or (row["id"], row["prompt"]) in seen:
            continue
        seen.add((row["id"], row["prompt"]))
        # The reference stated in the form its kind's prompt template asks for.
        completion = kind_of(row["kind"]).reference_form.format(reference=row["reference"])
        rows.append({"prompt": row["prompt"], "completion": completion, "label": True, "id": row["id"],
                     "competitor": REFERENCE, "sample": 0})
    return pa.Table.from_pylist(rows, schema=KTO)


def kto_table(marked: pa.Table, with_reference: bool = False) -> pa.Table:
    usable = pc.and_(pc.is_null(marked["error"]), pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(marked["completion"])), 0))
    rows = marked.filter(usable)
    out = pa.table(
        {
            "prompt": rows["prompt"],
            "completion": rows["completion"],
            "label": rows["correct"],
            "id": rows["id"],
            "competitor": rows["competitor"],
            "sample": rows["sample"],
        }
    )
    out = check(out, KTO, "datasets/kto")
    return pa.concat_tables([out, reference_rows(marked)]) if with_reference else out


def negatives_table(marked: pa.Table) -> pa.Table:
    return check(marked.filter(pc.invert(marked["correct"])), NEGATIVES, "datasets/negatives")


def pairs_table(marked: pa.Table) -> pa.Table:
    right: dict[str, list[dict]] = defaultdict(list)
    wrong: dict[str, list[dict]] = defaultdict(list)
    for row in marked.sort_by([("id", "ascending"), ("competitor", "ascending"), ("sample", "ascending")]).to_pylist():
        if row["error"] or not (row["completion"] or "").strip():
            continue
        (right if row["correct"] else wrong)[row["id"]].append(row)
    pairs = []
    for item_id in sorted(right.keys() & wrong.keys()):
        for chosen, rejected in zip(right[item_id], wrong[item_id]):
            pairs.append(
                {
                    "prompt": chosen["prompt"],
                    "chosen": chosen["completion"],
                    "rejected": rejected["completion"],
                    "id": item_id,
                    "chosen_competitor": chosen["competitor"],
                    "rejected_competitor": rejected["competitor"],
                }
            )
    return pa.Table.from_pylist(pairs, schema=PAIRS)


def auto_desirable_weight(n_desirable: int, n_undesirable: int) -> float | None:
    """KTO's `weights: auto`: with lambda_U = 1, the lambda_D that puts lambda_D*n_D/(lambda_U*n_U)
    at the low end of the paper's range (1); None when one label is absent (the ratio is undefined).
    The one formula behind the datasets' recommendation and the trainer's weights
    (lossaverse.training.kto.kto_weights)."""
    if n_desirable == 0 or n_undesirable == 0:
        return None
    return n_undesirable / n_desirable * KTO_RATIO_RANGE[0]


def recommended_weights(n_desirable: int, n_undesirable: int) -> dict | None:
    """`auto_desirable_weight` as the datasets' stats record it, with its ratio and the range."""
    if (auto := auto_desirable_weight(n_desirable, n_undesirable)) is None:
        return None
    desirable = round(auto, 4)
    return {
        "desirable_weight": desirable,
        "undesirable_weight": 1.0,
        "ratio": round(desirable * n_desirable / n_undesirable, 4),
        "ratio_range": list(KTO_RATIO_RANGE),
    }


def _item_accuracy(rows: pa.Table) -> dict[str, float]:
    """Per item: the share of its answers marked right (the unit the bootstrap resamples)."""
    right: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(rows["id"].to_pylist(), rows["correct"].to_pylist()):
        right[item].append(bool(ok))
    return {item: sum(v) / len(v) for item, v in right.items()}


def competitor_accuracy(marked: pa.Table, n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per competitor (or evaluated model): model, answers, correct, accuracy with 95% intervals
    (Wilson over answers; bootstrap over items), items, counts per reason."""
    per: dict[str, dict] = {}
    for name in sorted(set(marked["competitor"].to_pylist())):
        rows = marked.filter(pc.equal(marked["competitor"], name))
        n, right = rows.num_rows, int(pc.sum(rows["correct"]).as_py() or 0)
        reasons = Counter(rows["reason"].to_pylist())
        items = _item_accuracy(rows)
        lo, hi = wilson_interval(right, n)
        blo, bhi = bootstrap_ci(list(items.values()), n_boot, seed) if items else (0.0, 1.0)
        per[name] = {
            "model": rows["model"][0].as_py(),
            "answers": n,
            "correct": right,
            "accuracy": right / n if n else 0.0,
            "ci95_wilson": [lo, hi],
            "items": len(items),
            "ci95_bootstrap_items": [blo, bhi],
            "reasons": {r: reasons.get(r, 0) for r in REASONS},
        }
    return per


def agreement_table(marked: pa.Table, first: str = "large", second: str = "small", n_boot: int = 2000, seed: int = 0) -> dict:
    """Both right / only `first` / only `second` / both wrong over (item, sample) pairs answered by
    both, McNemar's exact p on the discordant pairs, and the paired accuracy difference
    (first - second) with its bootstrap interval over items."""
    verdicts = {(r["id"], r["sample"], r["competitor"]): bool(r["correct"]) for r in marked.select(["id", "sample", "competitor", "correct"]).to_pylist()}
    names = {(True, True): "both_right", (True, False): f"{first}_only", (False, True): f"{second}_only", (False, False): "both_wrong"}
    counts = Counter()
    per_item: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for (item, sample, comp), ok in verdicts.items():
        if comp != first or (item, sample, second) not in verdicts:
            continue
        other = verdicts[(item, sample, second)]
        counts[names[(ok, other)]] += 1
        per_item[item].append((ok, other))
    out = {k: counts.get(k, 0) for k in names.values()}
    out["mcnemar_p"] = mcnemar_exact(out[f"{first}_only"], out[f"{second}_only"])
    if per_item:
        a = [sum(x for x, _ in v) / len(v) for v in per_item.values()]
        b = [sum(y for _, y in v) / len(v) for v in per_item.values()]
        out["accuracy_diff"] = paired_bootstrap_diff(a, b, n_boot, seed)
    return out


def label_counts(kto: pa.Table) -> dict:
    """stats.json's `labels` of kto rows: desirable, undesirable, total, desirable_fraction,
    reference_rows (the rows of competitor `reference`)."""
    n_d = int(pc.sum(kto["label"]).as_py() or 0)
    return {"desirable": n_d, "undesirable": kto.num_rows - n_d, "total": kto.num_rows,
            "desirable_fraction": n_d / kto.num_rows if kto.num_rows else 0.0,
            "reference_rows": kto.filter(pc.equal(kto["competitor"], REFERENCE)).num_rows}


def stats(marked: pa.Table, kto: pa.Table, seed: int = 0) -> dict:
    per = competitor_accuracy(marked, seed=seed)
    labels = label_counts(kto)
    reasons = Counter(marked["reason"].to_pylist())
    return {
        "competitors": per,
        "agreement": agreement_table(marked, seed=seed),
        "reasons": {r: reasons.get(r, 0) for r in REASONS},
        "labels": labels,
        "excluded_from_kto": marked.num_rows - (kto.num_rows - labels["reference_rows"]),
        "recommended_kto_weights": recommended_weights(labels["desirable"], labels["undesirable"]),
    }


def with_prompts(marked: pa.Table, prompt_of: Callable[[dict], str]) -> pa.Table:
    """`marked` with each row's `prompt` replaced by `prompt_of(row)` (the target's rendering)."""
    rows = marked.select([c for c in ITEMS.names if c in marked.column_names]).to_pylist()
    index = marked.column_names.index("prompt")
    return marked.set_column(index, "prompt", pa.array([prompt_of(r) for r in rows], pa.string()))


def build_datasets(marked: pa.Table, with_reference: bool = False, seed: int = 0,
                   prompt_of: Callable[[dict], str] | None = None) -> dict:
    """marked rows -> {"kto", "negatives", "pairs": tables, "stats": dict}. With `prompt_of` (item
    row -> prompt), the training rows (kto, pairs) carry that prompt instead of the one the
    competitor was sent; negatives keep what each competitor saw."""
    marked = check(marked, MARKED, "marked")
    training = with_prompts(marked, prompt_of) if prompt_of is not None else marked
    kto = kto_table(training, with_reference)
    return {"kto": kto, "negatives": negatives_table(marked), "pairs": pairs_table(training), "stats": stats(marked, kto, seed)}


def accumulate(built: dict, round: int, before: dict[str, pa.Table] | None = None) -> dict:
    """Tag this round's kto/negatives/pairs rows with `round` and put the rows of earlier rounds
    (`before`: the previous round's accumulated tables) in front of them. stats.json keeps this
    round's answers; its `labels` and recommended weights count every accumulated kto row, because
    those are what the trainer reads."""
    out = dict(built)
    for name in ("kto", "negatives", "pairs"):
        table = built[name].append_column("round", pa.array([round] * built[name].num_rows, pa.int32()))
        if before is not None:
            missing = set(table.column_names) - set(before[name].column_names)
            if missing:
                raise ValueError(f"earlier round's datasets/{name} lacks column(s) {sorted(missing)}")
            table = pa.concat_tables([before[name].select(table.column_names).cast(table.schema), table])
        out[name] = table
    kto = out["kto"]
    labels = label_counts(kto)
    stats = dict(built["stats"])
    stats["round"] = round
    stats["labels"] = {**stats["labels"], **{k: labels[k] for k in ("desirable", "undesirable", "total", "desirable_fraction")},
                       "rounds": sorted(set(kto["round"].to_pylist()))}
    stats["recommended_kto_weights"] = recommended_weights(labels["desirable"], labels["undesirable"])
    out["stats"] = stats
    return out
