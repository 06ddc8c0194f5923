"""training/gpubench.py at the tiny size on CPU: the script runs end to end, and its figures obey
the formulas its docstring states (MFU, the planner's estimate, the overhead ratio)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from typer.testing import CliRunner

from lossaverse.cluster.cli import app
from lossaverse.training import gpubench
from lossaverse.training.gpubench import PLAIN_EXTRA_FORWARDS, VARIANTS, mfu

GIB = 2**30
WITHOUT = {"ray", "vllm", "deepspeed"}  # what a GPU machine's bare Python lacks
PEAK_TFLOPS = 1.0  # CPU has no known peak; with one given, MFU is computed and can be checked


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """`python -m lossaverse bench gpu`, the one entry point, in a Python where Ray, vLLM and DeepSpeed
    cannot be imported (as on a GPU machine with only the GPU wheels); tiny's warm-up is 1 step."""
    out = tmp_path_factory.mktemp("gpubench")
    blocked = textwrap.dedent(f"""
        import runpy, sys
        for name in {sorted(WITHOUT)!r}:
            sys.modules[name] = None  # `import` raises ModuleNotFoundError, find_spec says absent
        sys.argv = ["lossaverse", "bench", "gpu", "--size", "tiny", "--out", {str(out)!r}, "--steps", "3",
                    "--peak-tflops", "{PEAK_TFLOPS}"]
        runpy.run_module("lossaverse", run_name="__main__")
    """)
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "wrote" in done.stdout
    return json.loads((out / "gpubench.json").read_text())


def test_bench_names_what_each_stage_needs():
    runner = CliRunner()
    no_out = runner.invoke(app, ["bench", "gpu", "--size", "tiny"])
    assert no_out.exit_code == 2 and "bench gpu needs --out DIR" in no_out.output
    no_config = runner.invoke(app, ["bench", "train"])
    assert no_config.exit_code == 2 and "bench train needs the run config" in no_config.output
    few = runner.invoke(app, ["bench", "train", "configs/local.yaml", "--steps", "4"])
    assert few.exit_code == 2 and "--steps 4: bench train needs at least 10" in few.output


def test_mfu_worked_example():
    """N = 5e8, 1e5 tokens/s, KTO with a reference copy (policy on the KL pairs, reference on the
    batch and on the KL pairs: 3 forwards): (6 + 2*3) * 5e8 * 1e5 = 6e14 FLOP/s; over the H200's
    dense bf16 peak, 6e14 / 989e12 = 0.60667. SFT (0 extra forwards) is half: 3e14 / 989e12 = 0.30334."""
    assert mfu(500_000_000, 1e5, 3, 989e12) == pytest.approx(0.60667, abs=1e-5)
    assert mfu(500_000_000, 1e5, 0, 989e12) == pytest.approx(0.30334, abs=1e-5)
    assert mfu(500_000_000, 1e5, 3, None) is None


def test_h200_peak_is_the_dense_bf16_figure():
    assert gpubench.PEAK_BF16_TFLOPS["H200"] == 989.0
    assert gpubench.device_peak_flops("cpu") is None
    assert gpubench.device_peak_flops("cpu", 2.0) == 2e12


def test_unknown_variant_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="kto_precompute"):
        gpubench.bench_gpu("tiny", variants=("kto_fast",))
    with pytest.raises(ValueError, match="0.5b"):
        gpubench.bench_gpu("huge")


def test_every_variant_and_plain_loop_runs_at_every_length(result):
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    seen = {(r["variant"], r["seq_len"]) for r in result["runs"]}
    names = list(VARIANTS) + [f"plain_{m}" for m in PLAIN_EXTRA_FORWARDS]
    assert seen == {(v, n) for v in names for n in gpubench.SIZES["tiny"]["seq_lens"]}
    for r in result["runs"]:
        for field in ("step_seconds", "samples_per_second", "tokens_per_second", "params", "trainable", "mfu"):
            assert r[field] > 0, (r["variant"], field)
        assert r["samples_per_second"] == pytest.approx(r["batch"] / r["step_seconds"])


def test_rows_fill_max_length_exactly(result):
    """The word tokenizer gives one token a word, and the trainers append one EOS: every TRL batch
    holds batch * seq_len tokens, the same as the plain loop's."""
    for r in result["runs"]:
        assert r["tokens_per_step"] == r["batch"] * r["seq_len"], r["variant"]


def test_mfu_in_the_json_follows_the_formula(result):
    for r in result["runs"]:
        flops = (6 + 2 * r["extra_forwards"]) * r["params"] * r["tokens_per_second"]
        assert r["mfu"] == pytest.approx(flops / (PEAK_TFLOPS * 1e12)), r["variant"]
    by = {r["variant"]: r["extra_forwards"] for r in result["runs"]}
    assert (by["kto"], by["kto_precompute"], by["kto_lora"], by["sft"]) == (3, 1, 3, 0)


def test_planner_estimate_matches_its_fp32_byte_counts(result):
    """On CPU (fp32) the planner counts 4 bytes of weights, 4 of gradients and 8 of Adam states per
    trainable parameter, and 4 more per parameter for a frozen reference copy, which KTO keeps only
    without precomputed log-probs and without LoRA. GPU memory is not measured on CPU."""
    for r in (r for r in result["runs"] if r["kind"] == "trl"):
        n, trainable = r["params"], r["trainable"]
        reference = 4 * n if r["variant"] == "kto" else 0
        assert r["estimate_gib"] == pytest.approx((4 * n + 12 * trainable + reference) / GIB), r["variant"]
        assert r["peak_gpu_gib"] is None and r["estimate_over_peak"] is None and r["within_tolerance"] is None
    lora = [r for r in result["runs"] if "lora" in r["variant"]]
    assert lora and all(0 < r["trainable"] < r["params"] for r in lora)


def test_overhead_is_trl_step_over_plain_step(result):
    for seq_len, ratios in result["overhead"].items():
        by = {r["variant"]: r for r in result["runs"] if r["seq_len"] == int(seq_len)}
        assert set(ratios) == {"kto", "sft"}
        for method, ratio in ratios.items():
            assert ratio == pytest.approx(by[method]["step_seconds"] / by[f"plain_{method}"]["step_seconds"])
