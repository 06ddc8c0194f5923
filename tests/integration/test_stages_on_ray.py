"""Integration tier: the stages on an embedded local Ray with the real vLLM CPU engine."""

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cluster.config import BenchmarkConfig, EngineConfig, SamplingConfig
from cluster.stages import mark_parquet
from pipeline.benchmarks import load_items
from pipeline.generate import generate_answers
from pipeline.rundir import read_table, write_table
from pipeline.schemas import ANSWERS, MARKED
from pipeline.tinymodels import resolve_model

pytestmark = pytest.mark.integration


def test_generate_keeps_a_failed_prompt_as_an_error_row(local_ray):
    items, _ = load_items(BenchmarkConfig(n_train=6, n_eval=1), seed=0)
    items = items.filter(pc.equal(items["split"], "train"))
    long_q = "How many apples " * 200 + "?"
    rows = items.to_pylist()
    rows[2]["question"] = long_q  # far beyond max_model_len: the engine rejects it
    items = pa.Table.from_pylist(rows, schema=items.schema)
    engine = EngineConfig(max_model_len=128, kv_cache_gib=0.1, enforce_eager=True, dtype="float32")
    sampling = SamplingConfig(samples=2, temperature=0.0, max_tokens=16)
    answers = generate_answers(items, [("small", resolve_model("tiny:small"), False)], engine, sampling, seed=0)
    assert answers.schema == ANSWERS
    assert answers.num_rows == 6 * 2  # one row per (item, sample), the failed ones included
    failed = answers.filter(pc.invert(pc.is_null(answers["error"])))
    assert sorted(set(failed["id"].to_pylist())) == [rows[2]["id"]]
    assert set(failed["finish_reason"].to_pylist()) == {"error"}
    ok = answers.filter(pc.is_null(answers["error"]))
    assert all(t > 0 for t in ok["completion_tokens"].to_pylist())
    # Greedy decoding is deterministic: both samples of an item agree.
    by_item = {}
    for r in ok.to_pylist():
        by_item.setdefault(r["id"], set()).add(r["completion"])
    assert all(len(v) == 1 for v in by_item.values())


def test_mark_stage_on_ray_conserves_rows(local_ray, tmp_path):
    rows = []
    for i in range(300):
        rows.append(dict(id=f"q{i}", question="q", reference=str(i), kind="numeric", choices=None, split="train",
                         source="t", competitor="large" if i % 2 else "small", model="m", sample=0, prompt="p",
                         completion=f"The answer is {i if i % 3 else i + 1}.", finish_reason="stop",
                         completion_tokens=5, error=None))
    write_table(pa.Table.from_pylist(rows, schema=ANSWERS), tmp_path / "answers")
    n = mark_parquet(tmp_path / "answers", tmp_path / "marked", batch_size=64)
    marked = read_table(tmp_path / "marked", MARKED).sort_by("id")
    assert n == 300 == marked.num_rows
    assert sorted(marked["id"].to_pylist()) == sorted(r["id"] for r in rows)
    assert pc.sum(marked["correct"]).as_py() == sum(1 for i in range(300) if i % 3)
