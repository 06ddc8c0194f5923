"""`lossaverse bench mark`: the real command writes bench.json with the rule path against
math-verify on the same rows, and the scaling plot."""

import json

import matplotlib.image as mpimg
import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e


def test_bench_mark_compares_the_rules_with_math_verify_on_the_same_rows(tmp_path):
    done = run_cli("bench", "mark", str(ROOT / "configs" / "local.yaml"), "--rows", "2000,4000", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert {"machine", "versions", "config", "mark"} <= set(result)
    for rows in ("2000", "4000"):
        m = result["mark"]["rows"][rows]
        assert set(m["kinds"]) == {"numeric", "math", "choice", "exact"}
        assert all(k["rows_per_s"]["median"] > 0 for k in m["kinds"].values())
        base = m["baseline"]
        # Same rows, same verdicts where both decide, apart from answers that go on to a new question.
        assert base["both_decide"] > 0 and base["agree"] + base["disagree"] == base["both_decide"]
        assert base["disagree"] == base["disagree_new_turn"]
    assert mpimg.imread(tmp_path / "bench_scaling.png").shape[0] > 100
    assert "math-verify rows/s" in done.stdout


def test_bench_refuses_an_unknown_stage():
    done = run_cli("bench", "serve", str(ROOT / "configs" / "local.yaml"))
    assert done.returncode == 2 and "unknown bench stage 'serve'" in done.stderr
