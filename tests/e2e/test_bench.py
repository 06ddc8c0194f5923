"""`lossaverse bench`: the real command writes bench.json with each stage against its baseline on
the same inputs, the memory figures and the scaling plot."""

import json

import matplotlib.image as mpimg
import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e


def test_bench_mark_compares_the_rules_with_math_verify_on_the_same_rows(tmp_path):
    done = run_cli("bench", "mark", str(ROOT / "configs" / "tiny.yaml"), "--rows", "2000,4000", "--out", str(tmp_path))
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
    assert "math-verify" in done.stdout and "memory MiB" in done.stdout
    memory = result["mark"]["memory"]
    assert memory["workers_peak_rss_mib"] > 0 and memory["driver_peak_rss_mib"] > 0 and memory["gpu_peak_mib"] is None
    assert memory["growth"]["rows"] == 4000 - 400


def test_bench_generate_runs_both_sides_on_the_same_work_and_refuses_a_rate_from_two_batches(tmp_path):
    """64 prompts in engine batches of 32: two batches, which arrive close together, so a rate taken
    from their arrivals would divide a batch's tokens by a few milliseconds. The stage and vLLM
    offline answer the same prompts with the same token budget, every run has memory figures, and
    no steady rate (nor a cost estimate on it) is given."""
    done = run_cli("bench", "generate", str(ROOT / "configs" / "tiny.yaml"), "--replicas", "1", "--prompts", "64",
                   "--set", "generate.engine.batch_size=32", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    g = json.loads((tmp_path / "bench.json").read_text())["generate"]
    assert g["same_work"]["rows"] == [64, 64]
    base_tokens, stage_tokens = g["same_work"]["tokens"]
    assert 0 < stage_tokens <= 64 * g["max_tokens"] and abs(stage_tokens - base_tokens) <= 0.02 * base_tokens
    one = g["replicas"]["1"]
    assert one["batches"] == 2 and one["steady_tokens_per_s"] is None and "give more prompts" in one["steady_note"]
    assert one["engines_running"] == 1
    assert g["ratio_steady"] is None and g["baseline"]["steady_tokens_per_s"]["median"] > 0
    assert g["scheduler_limits"]["max_num_seqs"] > 0 and g["scheduler_limits"]["max_num_batched_tokens"] > 0
    # The engine arguments both sides ran with, from the stage's builder: on CPU prompts are never split.
    assert g["engine_kwargs"]["enable_chunked_prefill"] is False
    for memory in (one["memory"], g["baseline"]["memory"]):
        # a vLLM engine (model, KV cache, the engine core process) is far bigger than nothing
        assert memory["driver_peak_rss_mib"] > 50 and memory["workers_peak_rss_mib"] > 300 and memory["gpu_peak_mib"] is None
    assert g["memory"]["growth"]["process"] == "driver" and abs(g["memory"]["growth"]["mib"]) < 200
    assert "n/a" in done.stdout and "no cost estimate" in done.stdout
    assert mpimg.imread(tmp_path / "bench_scaling.png").shape[0] > 100


def test_bench_refuses_an_unknown_stage():
    done = run_cli("bench", "serve", str(ROOT / "configs" / "tiny.yaml"))
    assert done.returncode == 2 and "unknown bench stage 'serve'" in done.stderr
