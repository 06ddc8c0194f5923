"""Benchmark loading: any source -> the `items` contract, plus a quarantine of rejected rows.

Conservation: every source row ends up either in the items table or in the quarantine table with
a reason, so `rows read == len(items) + len(quarantine)` for every split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from lossaverse.pipeline.data import synthetic
from lossaverse.pipeline.data.prompts import LETTERS
from lossaverse.pipeline.data.schemas import ITEMS, QUARANTINE, check
from lossaverse.pipeline.marker.marktext import reference_text


class BenchmarkError(ValueError):
    """A benchmark source that cannot be read at all (as opposed to one bad row)."""


def _synthetic(cfg, split: str, seed: int) -> Iterable[dict]:
    # Endless: load_items takes as many rows as the splits (validation, rounds) need.
    for row in synthetic.stream(split, seed, cfg.name):
        yield {"question": row["question"], "reference": row["reference"]}


def _jsonl(cfg, split: str, seed: int) -> Iterable[dict | str]:
    # Line by line rather than pyarrow.json: one malformed line must be quarantined, not fail the file.
    path = Path(cfg.splits[split]).expanduser()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path}:{lineno}: not valid JSON ({exc.msg})"
                continue
            yield row if isinstance(row, dict) else f"{path}:{lineno}: not a JSON object"


def _parquet(cfg, split: str, seed: int) -> Iterable[dict]:
    path = Path(cfg.splits[split]).expanduser()
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise BenchmarkError(f"benchmark file {path} is not readable Parquet: {exc}") from exc
    yield from table.to_pylist()


def _huggingface(cfg, split: str, seed: int) -> Iterable[dict]:
    import datasets  # deferred: datasets loads in seconds

    try:
        ds = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.splits[split])
    except Exception as exc:  # hub errors come in many types; all mean "cannot load this source"
        raise BenchmarkError(f"cannot load Hugging Face dataset {cfg.path!r} split {cfg.splits[split]!r}: {exc}") from exc
    yield from ds


LOADERS: dict[str, Callable[..., Iterable[dict | str]]] = {
    "synthetic": _synthetic,
    "jsonl": _jsonl,
    "parquet": _parquet,
    "huggingface": _huggingface,
}


def _choices(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, dict) and "text" in value:  # ARC: {"text": [...], "label": [...]}
        value = value["text"]
    if isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value):
        return list(value)
    raise ValueError("choices must be a list of strings")


def _numeric_reference(reference: str) -> str:
    """A numeric reference as the marker reads it (lossaverse.pipeline.marker.marktext.reference_text: "−5" -> "-5",
    "5 dollars" -> "5"); ValueError for one no answer could ever match ("3:30")."""
    text = reference_text(reference)
    if text is None:
        raise ValueError(f"numeric reference {reference!r} is not one number the marker can read (like '42', '-5', '3/4', '1,000', '5 dollars')")
    return text


def normalize(raw: dict, cfg, split: str, index: int) -> dict:
    """Map one source row onto the items contract; raise ValueError with the reason if unusable."""
    cols = {"id": "id", "question": "question", "reference": "reference", "choices": "choices", **cfg.columns}
    question = raw.get(cols["question"])
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"missing or empty {cols['question']!r}")
    reference = raw.get(cols["reference"])
    if isinstance(reference, bool) or reference is None:
        raise ValueError(f"missing or empty {cols['reference']!r}")
    raw_choices = raw.get(cols["choices"])
    choices = _choices(raw_choices)
    if cfg.kind == "choice" and choices and len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} options, more than the {len(LETTERS)} option letters A-Z")
    if isinstance(reference, int) and cfg.kind == "choice":  # MMLU: index of the right option
        if not 0 <= reference < len(choices or LETTERS):
            raise ValueError(f"answer index {reference} out of range for {len(choices or LETTERS)} options")
        reference = LETTERS[reference]
    reference = str(reference)
    if cfg.kind == "choice" and isinstance(raw_choices, dict) and raw_choices.get("label") is not None:
        # ARC: the key names a label ("A".."E", or "1".."4" in some rows); prompts show letters.
        labels = [str(x) for x in raw_choices["label"]]
        if len(labels) != len(choices):
            raise ValueError(f"{len(labels)} choice labels for {len(choices)} choice texts")
        if reference.strip() not in labels:
            raise ValueError(f"answer key {reference!r} is not one of the labels {labels}")
        reference = LETTERS[labels.index(reference.strip())]
    if cfg.reference_after:
        if cfg.reference_after not in reference:
            raise ValueError(f"reference has no {cfg.reference_after!r} marker")
        reference = reference.rsplit(cfg.reference_after, 1)[1]
    reference = reference.strip()
    if not reference:
        raise ValueError(f"missing or empty {cols['reference']!r}")
    if cfg.kind == "choice" and not choices:
        raise ValueError("kind `choice` needs a non-empty choices list")
    if cfg.kind == "numeric":
        reference = _numeric_reference(reference)
    item_id = raw.get(cols["id"])
    return {
        "id": str(item_id) if item_id not in (None, "") else f"{cfg.name}-{split}-{index:06d}",
        "question": question.strip(),
        "reference": reference,
        "kind": cfg.kind,
        "choices": choices,
        "split": split,
        "source": f"{cfg.source}:{cfg.path or cfg.name}",
    }


def load_items(cfg, seed: int, round: int = 1) -> tuple[pa.Table, pa.Table]:
    """The benchmark's items for round `round` as (items, quarantine) tables.

    The source's train split is read in order and carved into consecutive blocks of usable rows:
    the first `n_validation` rows are split `validation` (for tuning; never used to generate
    training data), then `n_train` rows per round, so every round answers fresh items; the eval
    split gives the first `n_eval` rows (deterministic caps). Rows of other rounds' blocks are
    neither items nor quarantined here (they belong to those rounds).
    """
    items, rejected, seen = [], [], set()
    wanted = {"train": cfg.n_validation + round * cfg.n_train, "eval": cfg.n_eval}
    first_train = cfg.n_validation + (round - 1) * cfg.n_train
    for split in ("train", "eval"):
        kept = 0
        for index, raw in enumerate(LOADERS[cfg.source](cfg, split, seed)):
            if kept >= wanted[split]:
                break
            if isinstance(raw, str):
                rejected.append({"source": f"{split}", "row": "", "reason": raw})
                continue
            try:
                row = normalize(raw, cfg, split, index)
                if row["id"] in seen:
                    raise ValueError(f"duplicate id {row['id']!r}")
            except ValueError as exc:
                rejected.append(
                    {"source": f"{split}", "row": json.dumps(raw, default=str)[:2000], "reason": f"row {index}: {exc}"}
                )
                continue
            seen.add(row["id"])
            kept += 1
            if split == "train":
                if kept <= cfg.n_validation:
                    row["split"] = "validation"
                elif kept <= first_train:
                    continue  # an earlier round's item
            items.append(row)
    if round > 1 and not any(r["split"] == "train" for r in items):
        raise BenchmarkError(
            f"benchmark {cfg.name!r}: no train items left for round {round} after {cfg.n_validation} validation "
            f"items and {round - 1} earlier round(s) of {cfg.n_train}; use a larger train split or fewer rounds"
        )
    return (
        check(pa.Table.from_pylist(items, schema=ITEMS), ITEMS, "items"),
        pa.Table.from_pylist(rejected, schema=QUARANTINE),
    )
