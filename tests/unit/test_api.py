"""The Python API (`import lossaverse`): config, marker, results, and `python -m lossaverse`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

import lossaverse as lv
from lossaverse.cluster.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_load_config_validates_and_applies_overrides():
    cfg = lv.load_config(ROOT / "configs" / "tiny.yaml", ["benchmark.n_eval=200", "train.beta=0.3"])
    assert cfg.benchmark.n_eval == 200 and cfg.train.beta == 0.3 and cfg.name == "tiny"
    with pytest.raises(ConfigError, match=r"train\.beta"):
        lv.load_config(ROOT / "configs" / "tiny.yaml", ["train.beta=-1"])


def test_mark_grades_rows_in_order_and_keeps_the_callers_columns():
    rows = [
        {"kind": "numeric", "reference": "42", "completion": "6 * 7 = 42. The answer is 42.", "id": "a"},
        {"kind": "numeric", "reference": "42", "completion": "6 * 7 = 41. The answer is 41."},
        {"kind": "choice", "reference": "B", "completion": "The answer is (B).", "choices": ["1", "2"]},
        {"kind": "numeric", "reference": "7", "completion": "3 + 4 = 7. The answer is", "finish_reason": "length"},
    ]
    out = lv.mark(rows)
    assert out["correct"].to_pylist() == [True, False, True, False]
    assert out["extracted"].to_pylist()[:3] == ["42", "41", "B"]
    assert out["reason"].to_pylist()[1] == "mismatch" and out["reason"].to_pylist()[3] == "truncated"
    assert out["id"].to_pylist() == ["a", None, None, None]  # the caller's column, unchanged

    table = pa.table({"kind": ["numeric"] * 2, "reference": ["3", "5"], "completion": ["The answer is 3.", "The answer is 4."],
                      "model": ["m1", "m2"]})
    marked = lv.mark(table)
    assert marked.column_names == ["kind", "reference", "completion", "model", "correct", "extracted", "reason", "marked_by"]
    assert marked["correct"].to_pylist() == [True, False] and marked["model"].to_pylist() == ["m1", "m2"]


@pytest.mark.parametrize("row, message", [
    ({"kind": "numeric", "completion": "The answer is 1."}, r"mark: row 1: reference: Field required"),
    ({"kind": "poem", "reference": "1", "completion": "1"}, r"mark: row 1: kind: unknown benchmark kind 'poem'"),
    ({"kind": "choice", "reference": "A", "completion": "A"}, r"mark: row 1: kind `choice` needs `choices`"),
])
def test_mark_names_the_bad_row_and_field(row, message):
    good = {"kind": "numeric", "reference": "1", "completion": "The answer is 1."}
    with pytest.raises(ValueError, match=message):
        lv.mark([good, row])


def test_results_reads_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        lv.results(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"evaluate": {"seconds": 3}}}))
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"target-base": {"accuracy": 0.25}, "pairs": []}))
    res = lv.results(tmp_path)
    assert res["stages"] == {"evaluate": {"seconds": 3}} and res["eval"]["target-base"]["accuracy"] == 0.25
    assert "rounds" not in res and "tune" not in res


def test_run_refuses_an_unknown_stage_before_any_work(tmp_path):
    cfg = lv.load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['generation'\]; valid: \['items', 'generate'"):
        lv.run(cfg, ["generation"])
    assert not (tmp_path / "tiny").exists()
    assert list(lv.STAGES) == ["items", "generate", "mark", "datasets", "train", "evaluate"]


def test_python_dash_m_is_the_command_line(tmp_path):
    """From another directory, `python -m lossaverse check` validates a config like the script does."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("beta: 0.5", "beta: -0.5"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "lossaverse", "check", str(bad)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "train.beta" in out.stderr
