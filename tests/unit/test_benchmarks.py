import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.config import BenchmarkConfig
from pipeline.benchmarks import BenchmarkError, load_items
from pipeline.schemas import ITEMS


def test_synthetic_is_deterministic_by_seed():
    cfg = BenchmarkConfig(n_train=20, n_eval=10)
    a, _ = load_items(cfg, seed=3)
    b, _ = load_items(cfg, seed=3)
    c, _ = load_items(cfg, seed=4)
    assert a.equals(b) and not a.equals(c)
    assert a.schema == ITEMS and a.num_rows == 30
    assert sorted(set(a["split"].to_pylist())) == ["eval", "train"]
    assert len(set(a["id"].to_pylist())) == 30


def test_jsonl_bad_rows_are_quarantined_and_none_lost(tmp_path):
    lines = [
        json.dumps({"question": "1+1?", "answer": "Work: 1+1=2\n#### 2"}),
        "{not json",
        json.dumps({"question": "", "answer": "#### 3"}),
        json.dumps({"question": "2+2?"}),
        json.dumps({"question": "3+3?", "answer": "no marker"}),
        json.dumps({"question": "4+4?", "answer": "#### 8"}),
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": "5+5?", "answer": "#### 10"}) + "\n")
    cfg = BenchmarkConfig(source="jsonl", name="gsm8k", path=str(tmp_path), splits={"train": str(train), "eval": str(test)},
                          columns={"reference": "answer"}, reference_after="####")
    items, quarantine = load_items(cfg, seed=0)
    assert items.num_rows + quarantine.num_rows == len(lines) + 1
    assert items["reference"].to_pylist() == ["2", "8", "10"]
    reasons = " | ".join(quarantine["reason"].to_pylist())
    assert "not valid JSON" in reasons
    assert "missing or empty 'question'" in reasons
    assert "missing or empty 'answer'" in reasons
    assert "no '####' marker" in reasons


def test_duplicate_ids_are_quarantined(tmp_path):
    rows = [{"id": "a", "question": "q1", "reference": "1"}, {"id": "a", "question": "q2", "reference": "2"}]
    path = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = BenchmarkConfig(source="parquet", path=str(path), splits={"train": str(path), "eval": str(path)})
    items, quarantine = load_items(cfg, seed=0)
    # The eval split reads the same file: every later "a" is a duplicate.
    assert items.num_rows == 1 and quarantine.num_rows == 3
    assert all("duplicate id 'a'" in r for r in quarantine["reason"].to_pylist())


def test_mmlu_and_arc_formats_map_to_letters(tmp_path):
    mmlu = tmp_path / "mmlu.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 2}]), mmlu)
    cfg = BenchmarkConfig(source="parquet", kind="choice", path=str(mmlu), splits={"train": str(mmlu), "eval": str(mmlu)},
                          columns={"reference": "answer"}, n_eval=1)
    items, quarantine = load_items(cfg, seed=0)
    assert items["reference"].to_pylist() == ["C", "C"] and items["choices"][0].as_py() == ["a", "b", "c", "d"]
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"id": "x", "question": "q", "choices": {"text": ["p", "q"], "label": ["A", "B"]}, "answerKey": "B"}) + "\n")
    cfg = BenchmarkConfig(source="jsonl", kind="choice", path=str(arc), splits={"train": str(arc)}, columns={"reference": "answerKey"})
    items, _ = load_items(cfg.model_copy(update={"splits": {"train": str(arc), "eval": str(arc)}}), seed=0)
    assert items["reference"][0].as_py() == "B" and items["choices"][0].as_py() == ["p", "q"]


def test_unreadable_parquet_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    cfg = BenchmarkConfig(source="parquet", path=str(bad), splits={"train": str(bad), "eval": str(bad)})
    with pytest.raises(BenchmarkError, match="is not readable Parquet"):
        load_items(cfg, seed=0)


def test_math500_format(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [{"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "...", "answer": "\\frac{3}{4}", "subject": "Algebra",
             "level": 1, "unique_id": "test/algebra/1.json"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = BenchmarkConfig(source="jsonl", kind="math", name="math500", path=str(path), splits={"train": str(path), "eval": str(path)},
                          columns={"id": "unique_id", "question": "problem", "reference": "answer"})
    items, quarantine = load_items(cfg, seed=0)
    # The same file as both splits: the second copy of the id is quarantined, not silently dropped.
    assert items.to_pylist()[0]["reference"] == "\\frac{3}{4}" and items["kind"][0].as_py() == "math"
    assert quarantine.num_rows == 1 and "duplicate id" in quarantine["reason"][0].as_py()
