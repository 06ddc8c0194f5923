"""Integration tier: the stages on an embedded local Ray with the real vLLM CPU engine."""

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lossaverse.cluster.stages import mark_parquet
from lossaverse.pipeline.data.rundir import read_table, write_table
from lossaverse.pipeline.data.schemas import ANSWERS, MARKED

pytestmark = pytest.mark.integration


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
