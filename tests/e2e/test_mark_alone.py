"""`lossaverse mark --answers PATH --out DIR` on answers produced elsewhere, graded as a careful
human grader would grade them (GSM8K-style numeric references)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import MARKED
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e

DATA = Path(__file__).resolve().parents[1] / "data"


def test_mark_hand_written_gsm8k_answers_as_a_careful_grader_would(tmp_path):
    """tests/data/gsm8k_answers.parquet: 21 model answers to GSM8K test items written by hand (the
    verdicts a careful grader gives are in gsm8k_answers.jsonl's expect_* columns)."""
    expected = [json.loads(line) for line in (DATA / "gsm8k_answers.jsonl").read_text().splitlines()]
    out = run_cli("mark", "--answers", str(DATA / "gsm8k_answers.parquet"), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-2000:]
    marked = read_table(tmp_path / "out" / "marked", MARKED)
    got = {(r["id"], r["competitor"], r["sample"]): (r["correct"], r["reason"]) for r in marked.to_pylist()}
    assert got == {(e["id"], e["competitor"], e["sample"]): (e["expect_correct"], e["expect_reason"]) for e in expected}
    stats = json.loads((tmp_path / "out" / "datasets" / "stats.json").read_text())
    assert sum(c["answers"] for c in stats["competitors"].values()) == len(expected)
    large = stats["competitors"]["large"]
    right = sum(e["expect_correct"] for e in expected if e["competitor"] == "large")
    assert large["correct"] == right and large["ci95_wilson"][0] < large["accuracy"] < large["ci95_wilson"][1]
    assert stats["reasons"]["error"] == 1 and stats["reasons"]["truncated"] == 1
    assert stats["labels"]["total"] == len(expected) - 2  # the error row and the empty answer have nothing to learn from


def test_mark_refuses_a_file_off_contract(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "answer": ["7"]}), tmp_path / "bad.parquet")
    out = run_cli("mark", "--answers", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    assert "missing column(s)" in out.stderr and "question" in out.stderr
