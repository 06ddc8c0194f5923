"""Alignment datasets from marked answers: `kto`, `negatives`, `pairs` and `stats.json`.

Pure functions over pyarrow tables:
- kto: (prompt, completion, label) per answer with a non-empty completion and no inference error,
  label = the marker's verdict (TRL's unpaired-preference format).
- negatives: every wrong marked row, all columns (errors, empty and truncated answers included).
- pairs: (prompt, chosen, rejected) for items with at least one right and one wrong answer,
  matched in (competitor, sample) order, as many pairs as the smaller side has.
- stats: accuracy per competitor, agreement table, label balance, recommended KTO weights.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schemas import KTO, MARKED, NEGATIVES, PAIRS, REASONS, check

# KTO paper (Ethayarajh et al., 2024, Sec. 4.2): keep lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
KTO_RATIO_RANGE = (1.0, 4 / 3)


def kto_table(marked: pa.Table) -> pa.Table:
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
    return check(out, KTO, "datasets/kto")


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


def recommended_weights(n_desirable: int, n_undesirable: int) -> dict | None:
    """lambda_U = 1 and lambda_D chosen so that lambda_D*n_D/(lambda_U*n_U) = 1, the low end of
    the paper's range; None when one label is absent (the ratio is undefined)."""
    if n_desirable == 0 or n_undesirable == 0:
        return None
    return {
        "desirable_weight": round(n_undesirable / n_desirable * KTO_RATIO_RANGE[0], 4),
        "undesirable_weight": 1.0,
        "ratio_range": list(KTO_RATIO_RANGE),
    }


def competitor_accuracy(marked: pa.Table) -> dict[str, dict]:
    """Per competitor (or evaluated model): model, answers, correct, accuracy, counts per reason."""
    per: dict[str, dict] = {}
    for name in sorted(set(marked["competitor"].to_pylist())):
        rows = marked.filter(pc.equal(marked["competitor"], name))
        n, right = rows.num_rows, int(pc.sum(rows["correct"]).as_py() or 0)
        reasons = Counter(rows["reason"].to_pylist())
        per[name] = {
            "model": rows["model"][0].as_py(),
            "answers": n,
            "correct": right,
            "accuracy": right / n if n else 0.0,
            "reasons": {r: reasons.get(r, 0) for r in REASONS},
        }
    return per


def stats(marked: pa.Table, kto: pa.Table) -> dict:
    per = competitor_accuracy(marked)
    verdicts = {(r["id"], r["sample"], r["competitor"]): r["correct"] for r in marked.select(["id", "sample", "competitor", "correct"]).to_pylist()}
    agreement = Counter()
    for (item, sample, comp), ok in verdicts.items():
        if comp != "large" or (item, sample, "small") not in verdicts:
            continue
        other = verdicts[(item, sample, "small")]
        agreement[{(True, True): "both_right", (True, False): "large_only", (False, True): "small_only", (False, False): "both_wrong"}[(ok, other)]] += 1
    n_d = int(pc.sum(kto["label"]).as_py() or 0)
    n_u = kto.num_rows - n_d
    return {
        "competitors": per,
        "agreement": {k: agreement.get(k, 0) for k in ("both_right", "large_only", "small_only", "both_wrong")},
        "labels": {"desirable": n_d, "undesirable": n_u, "total": kto.num_rows},
        "excluded_from_kto": marked.num_rows - kto.num_rows,
        "recommended_kto_weights": recommended_weights(n_d, n_u),
    }


def build_datasets(marked: pa.Table) -> dict:
    """marked rows -> {"kto", "negatives", "pairs": tables, "stats": dict}."""
    marked = check(marked, MARKED, "marked")
    kto = kto_table(marked)
    return {"kto": kto, "negatives": negatives_table(marked), "pairs": pairs_table(marked), "stats": stats(marked, kto)}
