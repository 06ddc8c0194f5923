"""`lossaverse mark --answers PATH --out DIR` on answers produced elsewhere, graded as a careful
human grader would grade them (GSM8K-style numeric references)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.rundir import read_table
from pipeline.schemas import ANSWERS, MARKED
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e

# (completion, reference, finish_reason, error) -> (correct, reason)
CASES = [
    ("Natalia sold 48/2 = 24 clips in May. 48 + 24 = 72. #### 72", "72", "stop", None, True, "match"),
    ("She earns $10 an hour, so the answer is $10.", "10", "stop", None, True, "match"),
    ("The total is 1,000 dollars.", "1000", "stop", None, True, "match"),
    ("3 + 4 = 8. The answer is 8.", "7", "stop", None, False, "mismatch"),
    ("Let me add 12 and 30 and then", "42", "length", None, False, "truncated"),
    ("", "3", "stop", None, False, "no_answer"),
    ("", "3", "error", "prompt too long", False, "error"),
]


def test_mark_answers_written_elsewhere(tmp_path):
    rows = [
        dict(id=f"g{i}", question="q", reference=ref, kind="numeric", choices=None, split="eval", source="gsm8k",
             competitor="large" if i % 2 else "small", model="external", sample=0, prompt="p", completion=c,
             finish_reason=f, completion_tokens=len(c.split()), error=e)
        for i, (c, ref, f, e, _, _) in enumerate(CASES)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=ANSWERS), tmp_path / "answers.parquet")
    out = run_cli("mark", "--answers", str(tmp_path / "answers.parquet"), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-2000:]
    marked = read_table(tmp_path / "out" / "marked", MARKED).sort_by("id")
    got = {r["id"]: (r["correct"], r["reason"]) for r in marked.to_pylist()}
    assert got == {f"g{i}": (case[4], case[5]) for i, case in enumerate(CASES)}
    stats = json.loads((tmp_path / "out" / "datasets" / "stats.json").read_text())
    assert sum(c["answers"] for c in stats["competitors"].values()) == len(CASES)


def test_mark_refuses_a_file_off_contract(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "answer": ["7"]}), tmp_path / "bad.parquet")
    out = run_cli("mark", "--answers", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    assert "missing column(s)" in out.stderr and "question" in out.stderr
