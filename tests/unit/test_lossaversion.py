"""Loss aversion in the report (lossaverse.pipeline.report.lossaversion): the value function, the sweep, the ablation."""

import math

import pytest

from lossaverse.pipeline.data.rundir import read_json, write_json
from lossaverse.pipeline.report.lossaversion import ablation_lines, implied_rewards, sweep, value
from lossaverse.pipeline.report.report import render_report
from tests.unit.test_report import PNG_MAGIC, build_run


def test_value_function_by_hand():
    """beta 2, lambda_D 1, lambda_U 3: v(0) = 0; v(1) = sigmoid(2) - 1/2 = 0.380797; v(-1) = 3 *
    (sigmoid(-2) - 1/2) = -1.142391; slopes at 0 are beta/4 * lambda: 0.5 over gains, 1.5 over losses."""
    assert value(0.0, 2, 1, 3) == 0.0
    assert value(1.0, 2, 1, 3) == pytest.approx(1 / (1 + math.exp(-2)) - 0.5)
    assert value(-1.0, 2, 1, 3) == pytest.approx(-1.142391, abs=1e-6)
    eps = 1e-6
    assert value(eps, 2, 1, 3) / eps == pytest.approx(0.5, rel=1e-4)
    assert value(-eps, 2, 1, 3) / -eps == pytest.approx(1.5, rel=1e-4)
    assert value(50.0, 2, 1, 3) == pytest.approx(0.5) and value(-50.0, 2, 1, 3) == pytest.approx(-1.5)


def test_implied_rewards_are_relative_to_the_reference_point():
    """rewards are beta * log-ratio: z = reward / beta - kl."""
    metrics = [{"step": 1, "kl": 0.5, "rewards/chosen": 0.2, "rewards/rejected": -0.4}, {"step": 2, "loss": 1.0}]
    assert implied_rewards(metrics, 0.1) == {"desirable": [(1, pytest.approx(1.5))], "undesirable": [(1, pytest.approx(-4.5))]}


TUNE = {
    "items": 40, "baselines": [{"trial": "baseline-sft", "set": ["train.method=sft"], "method": "sft", "steps": 64,
                                "validation_accuracy": 0.30, "ci95": [0.2, 0.4], "gain": 0.05, "gain_ci95": [0.0, 0.1]}],
    "trials": [
        {"trial": "u1", "set": ["train.undesirable_weight=1.0"], "method": "kto", "steps": 64, "loss_aversion": 1.0,
         "validation_accuracy": 0.35, "ci95": [0.25, 0.45], "base_accuracy": 0.25, "gain": 0.10, "gain_ci95": [0.02, 0.18],
         "vs": {"sft": {"diff": 0.05, "ci95": [-0.01, 0.11], "items": 40, "mcnemar_p": 0.2}}},
        {"trial": "u0.1", "set": ["train.undesirable_weight=0.1"], "method": "kto", "steps": 64, "loss_aversion": 0.1,
         "validation_accuracy": 0.30, "ci95": [0.2, 0.4], "base_accuracy": 0.25, "gain": 0.05, "gain_ci95": [-0.01, 0.11],
         "vs": {"sft": {"diff": 0.0, "ci95": [-0.05, 0.05], "items": 40, "mcnemar_p": 1.0}}},
    ],
}


def test_ablation_table_and_sweep_order():
    lines = ablation_lines(TUNE)
    assert lines[0].endswith("vs sft at the same budget [95% CI] |")
    assert lines[2] == "| baseline: sft | 64 | 30.0% [20.0, 40.0] | +5.0 [+0.0, +10.0] |  |"
    assert lines[3] == "| train.undesirable_weight=1.0 | 64 | 35.0% [25.0, 45.0] | +10.0 [+2.0, +18.0] | +5.0 [-1.0, +11.0] |"
    assert [t["loss_aversion"] for t in sweep(TUNE)] == [0.1, 1.0]


def test_report_shows_loss_aversion_and_the_ablation(tmp_path):
    run_dir = build_run(tmp_path / "run")
    manifest = read_json(run_dir / "manifest.json")
    manifest["config"]["train"]["beta"] = 0.5
    write_json(manifest, run_dir / "manifest.json")
    manifest["stages"] = {"train": {"desirable_weight": 1.0, "undesirable_weight": 2.0}}
    write_json(manifest, run_dir / "manifest.json")
    write_json(TUNE, run_dir / "tune.json")
    out = render_report(run_dir)
    text = (run_dir / "report.md").read_text()
    assert "lambda_U/lambda_D = 2 (steeper over losses)" in text
    assert "## Ablation and tuning (40 validation items" in text
    assert "| train.undesirable_weight=1.0 | 64 | 35.0% [25.0, 45.0] |" in text
    for name in ("value_function.png", "loss_aversion.png"):
        path = run_dir / "report" / name
        assert path.read_bytes()[:8] == PNG_MAGIC and f"(report/{name})" in text
        assert str(path) in out["plots"]
    # rewards/chosen = 0.003 s, kl = 0.01 (s % 7), beta 0.5: z = 0.006 - 0.01 = -0.004 at step 1 and
    # 0.12 / 0.5 - 0.05 = +0.190 at step 40.
    assert "desirable rows, relative to the reference point: -0.004 at step 1, +0.190 at step 40" in text


def test_the_report_shows_sfts_validation_curve_from_tune(tmp_path):
    from lossaverse.pipeline.report.lossaversion import sft_curve_lines

    curve = {"sft_steps": 48, "stopped_gaining_at": 32, "rule": "the first step no later step beats",
             "points": [{"step": 16, "accuracy": 0.5, "ci95": [0.45, 0.55]},
                        {"step": 32, "accuracy": 0.6, "ci95": [0.55, 0.65], "vs_previous": {"diff": 0.1, "ci95": [0.05, 0.15], "mcnemar_p": 0.001}},
                        {"step": 48, "accuracy": 0.61, "ci95": [0.56, 0.66], "vs_previous": {"diff": 0.01, "ci95": [-0.01, 0.03], "mcnemar_p": 0.5}}]}
    lines = sft_curve_lines({**TUNE, "sft_curve": curve})
    assert lines[2] == "| 16 | 50.0% [45.0, 55.0] |  |"
    assert lines[3] == "| 32 | 60.0% [55.0, 65.0] | +10.0 [+5.0, +15.0] |"
    assert lines[-1].startswith("SFT stopped gaining at step 32 (the first step no later step beats); the recipe's KTO starts at step 48")
    run_dir = build_run(tmp_path / "run")
    write_json({**TUNE, "sft_curve": curve}, run_dir / "tune.json")
    render_report(run_dir)
    text = (run_dir / "report.md").read_text()
    assert "## SFT's validation curve (40 validation items" in text and "![SFT's validation curve](report/sft_curve.png)" in text
    assert (run_dir / "report" / "sft_curve.png").read_bytes()[:8] == PNG_MAGIC
