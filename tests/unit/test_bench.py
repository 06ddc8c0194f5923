"""The bench command's arithmetic: steady state from batch completions, the memory sampler, spread
and ratios of repeats, the cost model, the table and the scaling plot."""

import subprocess
import sys
import time

import matplotlib.image as mpimg
from rich.console import Console

from lossaverse.cluster.bench import bench_table, cost_model, default_prompts
from lossaverse.cluster.config import EngineConfig, load_config
from lossaverse.pipeline.bench.measure import PeakRSS, Timer, nvml, peak_memory, ratio, spread
from lossaverse.pipeline.bench.plots import plot_scaling
from lossaverse.pipeline.generation.shards import MIN_WAVES, Tally, steady_state
from tests.conftest import ROOT


def _generate_result(per_replica=1000.0, steady=True):
    point = lambda v: {"median": v, "min": v, "max": v, "n": 1}  # noqa: E731
    note = None if steady else "2 batches completed in 1 wave(s); a steady-state rate needs 4: give more prompts"
    memory = {"driver_peak_rss_mib": 800.0, "workers_peak_rss_mib": 3000.0, "worker_max_rss_mib": 2500.0, "gpu_peak_mib": None}
    replica = lambda r, v: {"steady_tokens_per_s": point(v) if steady else None, "steady_note": note,  # noqa: E731
                            "startup_s": point(30.0 + 10 * (r - 1)), "tokens_per_s": point(v / 3), "batches": 20,
                            "efficiency": (v / r) / per_replica if steady else None, "memory": memory}
    return {
        "machine": {"cpus": 2, "gpus": []},
        "generate": {
            "tokens_per_answer": 20.0,
            "baseline": {"steady_tokens_per_s": point(1100.0), "tokens_per_s": point(400.0), "startup_s": point(20.0)},
            "same_work": {"rows": [5120, 5120], "tokens": [96000, 96000]},
            "replicas": {1: replica(1, per_replica), 2: replica(2, 1.5 * per_replica)},
            "ratio_steady": round(per_replica / 1100.0, 3) if steady else None, "ratio_end_to_end": 0.83,
            "scaling_efficiency": 0.75 if steady else None,
            "memory": {**memory, "growth": {"process": "driver", "mib": 0.4, "rows": 3840}},
        },
        "mark": {"rows": {100000: {"kinds": {"numeric": {"rows_per_s": point(200_000.0)}},
                                   "baseline": {"rows_per_s": point(800.0)}, "ratio": 250.0}},
                 "memory": {"driver_peak_rss_mib": 900.0, "workers_peak_rss_mib": 150.0, "worker_max_rss_mib": 150.0,
                            "gpu_peak_mib": None, "growth": {"process": "marking worker", "mib": 1.0, "rows": 90000}}},
    }


def test_steady_state_of_batches_completing_one_after_another():
    """Start-up 30 s, then a batch of 500 tokens every 2 s: 5 batches at 30, 32, 34, 36, 38 s.
    The waves after the first hold 4 x 500 = 2000 tokens over 38 - 30 = 8 s: 250 tokens/s."""
    out = steady_state([(30.0 + 2 * i, 500) for i in range(5)])
    assert out["steady_tokens_per_s"] == 250.0 and out["steady_waves"] == 4 and out["steady_note"] is None


def test_two_batches_a_few_milliseconds_apart_give_no_steady_figure():
    """2 batches of 5,000 tokens arriving 30 ms apart after 87 s: the tokens that arrived after the
    first tenth of the rows over the time since would read ~300,000 tokens/s. Refused."""
    out = steady_state([(87.41, 5000), (87.44, 5000)])
    assert out["steady_tokens_per_s"] is None and "give more prompts" in out["steady_note"]
    assert steady_state([(10.0, 5000)] * 6)["steady_tokens_per_s"] is None  # all at once: one wave
    assert steady_state([])["steady_tokens_per_s"] is None


def test_batches_ending_microseconds_apart_at_the_end_are_one_wave():
    """8 batches in flight together in one engine (Ray Data LLM's max_concurrent_batches) all end at
    114.1 s, microseconds apart: a quarter of their mean gap is below a microsecond, so without a
    floor each would be its own wave and the rate would read ~20 million tokens/s. One wave: refused."""
    out = steady_state([(114.1 + i * 1e-6, 1400) for i in range(8)])
    assert out["steady_tokens_per_s"] is None and out["steady_waves"] == 0 and "1 wave(s)" in out["steady_note"]


def test_batches_completing_together_count_as_one_wave():
    """Two batches in flight together finish in pairs, 4 s apart: (10, 10.05), (14, 14.05), (18, 18.05),
    (22, 22.05), 400 tokens each. Pairs are waves; after the first: 6 x 400 = 2400 tokens over
    22.05 - 10.05 = 12 s = 200 tokens/s, the engine's real rate (one pair of 800 tokens per 4 s),
    where counting batches singly from the first completion would give 7 x 400 / 12.05 = 232."""
    pairs = [(t + d, 400) for t in (10.0, 14.0, 18.0, 22.0) for d in (0.0, 0.05)]
    out = steady_state(pairs)
    assert out["steady_waves"] == MIN_WAVES and out["steady_tokens_per_s"] == 200.0


def test_too_few_waves_are_refused_and_the_default_prompts_give_enough():
    assert steady_state([(10.0 + 3 * i, 100) for i in range(MIN_WAVES)])["steady_tokens_per_s"] is None
    assert steady_state([(10.0 + 3 * i, 100) for i in range(MIN_WAVES + 1)])["steady_tokens_per_s"] == round(300 / 9, 1)
    # per replica: twice the 4 waves needed, of the batches one replica holds at once (they tend to complete together)
    assert default_prompts(EngineConfig(batch_size=256, max_concurrent_batches=1)) == 8 * 256
    assert default_prompts(EngineConfig(batch_size=8, max_concurrent_batches=8)) == 512


def test_tally_groups_rows_by_engine_batch():
    tally = Tally(total=6)
    for i in range(6):
        tally.add(tokens=10, error=i == 5, batch="a" if i < 4 else "b")
    assert {k: v[1:] for k, v in tally.batches.items()} == {"a": [40, 4], "b": [20, 2]}
    assert tally.batches["a"][0] <= tally.batches["b"][0]  # a batch's time is its last row's arrival
    summary = tally.summary()
    assert (summary["tokens"], summary["errors"], summary["batches"]) == (60, 1, 2)
    assert summary["steady_tokens_per_s"] is None  # two batches: not a steady state


def test_peak_rss_sees_a_worker_process_and_no_gpu_on_cpu():
    """A child process holding 200 MiB is a worker; the driver's own RSS is counted apart."""
    code = "import time; x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(2)"
    with PeakRSS(interval=0.1, count_title=sys.executable) as rss:
        subprocess.run([sys.executable, "-c", code], check=True)
        middle = time.perf_counter()
    mib = rss.mib()
    assert rss.count == 1  # the one worker whose title names this Python
    assert mib["workers_peak_rss_mib"] >= 200 and mib["worker_max_rss_mib"] == mib["workers_peak_rss_mib"]
    assert 0 < mib["driver_peak_rss_mib"] < mib["workers_peak_rss_mib"] + 2000
    # None only where NVML is absent (a CPU machine); with a GPU, what the processes held (0 here)
    assert (mib["gpu_peak_mib"] is None) == (nvml() is None)
    before, after = rss.driver_at(middle)
    assert before > 0 and after >= 0


def test_peak_rss_leaves_out_a_worker_busy_before_the_block():
    """A process that was already running belongs to what ran before (e.g. an engine shutting down)."""
    earlier = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(100 * 2**20); time.sleep(3)"])
    try:
        time.sleep(1)
        with PeakRSS(interval=0.1) as rss:
            time.sleep(0.5)
        assert rss.mib()["workers_peak_rss_mib"] is None
    finally:
        earlier.wait()


def test_spread_reports_median_and_range():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_a_ratio_with_an_unmeasured_side_is_none():
    """1,000 / 1,100 = 0.90909... -> 0.909; nothing to compare with a missing or zero baseline."""
    assert ratio(1000.0, 1100.0) == 0.909 and ratio(1.0, 3.0, 1) == 0.3
    assert ratio(None, 1100.0) is None and ratio(1000.0, None) is None and ratio(1000.0, 0.0) is None


def test_peak_memory_takes_the_largest_figure_of_each_kind_over_runs():
    runs = [{"driver_peak_rss_mib": 800.0, "workers_peak_rss_mib": None, "worker_max_rss_mib": None, "gpu_peak_mib": None},
            {"driver_peak_rss_mib": 700.0, "workers_peak_rss_mib": 3000.0, "worker_max_rss_mib": 2500.0, "gpu_peak_mib": None}]
    assert peak_memory(runs) == {"driver_peak_rss_mib": 800.0, "workers_peak_rss_mib": 3000.0,
                                 "worker_max_rss_mib": 2500.0, "gpu_peak_mib": None}


def test_the_timer_counts_wall_time_apart_from_cpu_time():
    with Timer() as t:
        time.sleep(0.2)
    assert t.wall >= 0.2 and t.cpu < t.wall


def test_cost_model_scales_the_measured_per_replica_rate():
    """10,000 prompts x 4 samples x 20 tokens = 800,000 tokens; at 1,000 tokens/s per replica on
    8 replicas that is 100 s, plus 30 s start-up = 130 s = 0.0361 h. Marking 40,000 rows at
    200,000 rows/s takes 0.2 s, so generation is the bottleneck."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cost = cost_model(_generate_result(), cfg, prompts=10_000, samples=4, replicas=8)
    assert cost["generate_hours"] == round(130 / 3600, 3)
    assert cost["replica_hours"] == round(130 / 3600 * 8, 3)
    assert cost["gpu_hours"] is None  # CPU engines: no GPUs in the plan
    assert cost["bottleneck"] == "generate" and cost["mark_hours"] == round(40_000 / 200_000 / 3600, 5)
    gpu = load_config(ROOT / "configs" / "gsm8k.yaml")  # large: tensor parallel 2, one GPU per bundle
    assert cost_model(_generate_result(), gpu, 10_000, 4, 8)["inputs"]["gpus"] == 16


def test_no_cost_estimate_without_a_steady_rate():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cost = cost_model(_generate_result(steady=False), cfg, prompts=10_000, samples=4, replicas=8)
    assert set(cost) == {"note"} and "give more prompts" in cost["note"]


def _render(result) -> str:
    console = Console(width=200, record=True)
    console.print(bench_table(result))
    return console.export_text()


def test_table_shows_ratios_memory_and_refuses_an_unmeasured_steady_rate():
    text = _render(_generate_result())
    assert "0.91" in text and "scaling efficiency at 2 replicas" in text and "0.75" in text
    assert "800 / 3,000 (2,500) / n/a" in text and "driver RSS growth MiB over 3,840 more rows" in text
    assert "marking worker RSS growth MiB over 90,000 more rows" in text
    refused = _render(_generate_result(steady=False))
    assert "n/a" in refused and "give more prompts" in refused and "1,000" not in refused


def test_table_reports_the_math_verify_suite_and_each_disagreement():
    result = _generate_result()
    result["mark"]["rows"][100000]["math_verify_suite"] = {
        "rows": 277, "excluded": 17, "graded": 260, "agreement": 0.981, "false_positives": [],
        "disagreements": [{"id": "mv-test_all-test_number_extraction-02", "correct": True, "rules": False,
                           "source": "math-verify tests/test_all.py::test_number_extraction"}]}
    text = _render(result)
    assert "agreement with math-verify's tests (260 rows, 17 excluded), false positives 0" in text and "0.981" in text
    assert "mv-test_all-test_number_extraction-02: expected True, rules False" in text


def test_scaling_plot_is_written_also_without_a_steady_rate(tmp_path):
    for steady in (True, False):
        plot_scaling(_generate_result(steady=steady), tmp_path / f"scaling-{steady}.png")
        image = mpimg.imread(tmp_path / f"scaling-{steady}.png")
        assert image.shape[0] > 100 and image.shape[1] > 200


def test_train_bench_reports_medians_of_repeats_with_their_real_spread(monkeypatch):
    """Direct TRL 10, 12, 14 samples/s; Ray Train, 1 worker, DDP 9, 12, 13; ZeRO-2 8 each time.
    Medians 12 and 12; per-repeat ratios 0.9, 1.0, 0.929 -> median 0.929. The table's spreads are
    those of the repeats, not a median repeated."""
    import lossaverse.pipeline.models.tinymodels
    import lossaverse.training.bench

    direct, ddp = iter([10.0, 12.0, 14.0]), iter([9.0, 12.0, 13.0])
    monkeypatch.setattr(lossaverse.pipeline.models.tinymodels, "resolve_model", lambda path: path)
    monkeypatch.setattr(lossaverse.training.bench, "model_flops", lambda *args: lambda sps: {"peak_flops": 1e9, "sps": sps})
    monkeypatch.setattr(lossaverse.training.bench, "direct_in_subprocess", lambda *args: next(direct))
    monkeypatch.setattr(lossaverse.training.bench, "ray_samples_per_second",
                        lambda train, *args: next(ddp) if train.deepspeed == "none" else 8.0)
    from lossaverse.cluster.bench import bench_train_stage

    out = bench_train_stage(load_config(ROOT / "configs" / "tiny.yaml"), [1], 3, lambda line: None)
    assert out["baseline"]["samples_per_s"] == {"median": 12.0, "min": 10.0, "max": 14.0, "n": 3}
    assert out["workers"][1]["samples_per_s"] == {"median": 12.0, "min": 9.0, "max": 13.0, "n": 3}
    assert out["workers"][1]["zero2_samples_per_s"]["median"] == 8.0
    assert out["ratio"] == 0.929 and out["ray_vs_direct_per_repeat"] == [0.9, 1.0, 0.929]
    assert set(out["memory"]) == {"driver_peak_rss_mib", "workers_peak_rss_mib", "worker_max_rss_mib", "gpu_peak_mib"}


def test_train_bench_trains_the_configs_lora_target_on_both_sides(monkeypatch):
    """With `train.lora` in the config (configs/local.yaml), the direct TRL run and every Ray
    Train run get the same LoRA settings and max_length, so the ratio compares like for like."""
    import lossaverse.pipeline.models.tinymodels
    import lossaverse.training.bench

    seen = []
    monkeypatch.setattr(lossaverse.pipeline.models.tinymodels, "resolve_model", lambda path: path)
    monkeypatch.setattr(lossaverse.training.bench, "model_flops", lambda *args: lambda sps: {"peak_flops": 1e9, "sps": sps})
    monkeypatch.setattr(lossaverse.training.bench, "direct_in_subprocess", lambda train, *args: seen.append(("direct", train)) or 10.0)
    monkeypatch.setattr(lossaverse.training.bench, "ray_samples_per_second", lambda train, *args: seen.append(("ray", train)) or 9.0)
    from lossaverse.cluster.bench import bench_train_stage

    cfg = load_config(ROOT / "configs" / "local.yaml")
    out = bench_train_stage(cfg, [1], 1, lambda line: None, steps=20)
    assert [side for side, _ in seen] == ["direct", "ray", "ray"]  # direct, then DDP and ZeRO-2
    for _, train in seen:
        assert train.lora is not None and train.lora.r == 16 and train.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert train.max_length == 320 and train.max_steps == 20
    assert out["lora"]["r"] == 16 and out["max_length"] == 320 and out["steps"] == 20 and out["ratio"] == 0.9


def test_training_flops_per_token_worked_by_hand():
    """N = 1,000 parameters, L = 10 LoRA parameters.
    SFT, full: 6N = 6,000. SFT, LoRA: 4N + 6L = 4,060 (no weight gradients for the frozen N).
    KTO, full: 6N + 2N (the KL sequence's forward) + 4N (the reference on both) = 12,000.
    KTO, LoRA: 4,060 + 2,000 + 4,000 = 10,060; reference precomputed: 4,060 + 2,000 = 6,060."""
    import pytest

    from lossaverse.training.flops import extra_forwards, flops_per_token, mfu

    assert flops_per_token(1000, extra_forwards("sft")) == 6000
    assert flops_per_token(1000, extra_forwards("sft"), 10) == 4060
    assert flops_per_token(1000, extra_forwards("kto")) == 12000
    assert flops_per_token(1000, extra_forwards("kto"), 10) == 10060
    assert flops_per_token(1000, extra_forwards("kto", precomputed_reference=True), 10) == 6060
    with pytest.raises(ValueError, match="method 'dpo': not written"):
        extra_forwards("dpo")
    # 2 samples/s x 100 tokens x 12,000 FLOPs = 2.4 MFLOP/s: 24% of a 10 MFLOP/s peak.
    m = mfu(2.0, 100.0, 12000, 1e7)
    assert m["achieved_flops"] == 2.4e6 and m["mfu"] == pytest.approx(0.24)


def test_the_matmul_peak_probe_measures_a_plausible_rate():
    from lossaverse.training.flops import matmul_peak

    peak = matmul_peak(n=256, repeats=3, threads=1)
    assert 1e8 < peak < 1e13  # 0.1 GFLOP/s to 10 TFLOP/s for one fp32 thread


def test_model_flops_counts_the_models_parameters_and_its_lora_adapters():
    from transformers import AutoModelForCausalLM

    from lossaverse.pipeline.models.tinymodels import resolve_model
    from lossaverse.training.bench import model_flops, synthetic_kto_table

    path = resolve_model("tiny:small")
    table = synthetic_kto_table(8)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    full = model_flops(path, table, None, 64, 1)(2.0)
    assert full["flops_per_token"] == 12 * n and 0 < full["tokens_per_sample"] <= 64
    import pytest

    assert full["achieved_flops"] == pytest.approx(2.0 * full["tokens_per_sample"] * 12 * n, rel=1e-2) and 0 < full["mfu"] < 1
    lora = model_flops(path, table, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, 64, 1)(2.0)
    assert 10 * n < lora["flops_per_token"] < 12 * n  # 10N + 6L, L a small share of N
