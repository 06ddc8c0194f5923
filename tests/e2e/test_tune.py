"""End-to-end: `lossaverse tune` on the recipe (the default job's shape, on tiny models), in the
session's whole-loop run directory (tests/e2e/conftest.py). Tune reuses the run's data and train
stages (trained once, by `lossaverse run`); the run's models are scored on validation items carved
from the train split (the trial `configured`, with SFT's curve), SFT and RFT are the baselines, and
a trial of a KTO-only setting trains the KTO step alone from the run's SFT checkpoint. Tune never
answers the eval split, and tune.json ranks the trials."""

import hashlib
import json

import pyarrow.compute as pc
import pytest

from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS, ITEMS
from lossaverse.pipeline.report.report import render_report
from tests.conftest import run_cli
from tests.e2e.conftest import CURVE_STEP, KTO_STEPS, N_TRAIN, N_VALIDATION, SFT_STEPS

pytestmark = pytest.mark.e2e


def _eval_state(top) -> dict:
    """Every file under the run's eval/ by its bytes: what tune must leave as it found it."""
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((top / "eval").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tuned(whole_loop):
    top = whole_loop["dir"]
    before = _eval_state(top)
    args = ["tune", *whole_loop["args"][1:], "--grid", "train.beta=0.3"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return top, result.stdout, whole_loop, before


def test_trials_are_ranked_on_validation_items_against_sft_and_rft(tuned):
    top, out, *_ = tuned
    doc = json.loads((top / "tune.json").read_text())
    assert doc["split"] == "validation" and doc["items"] == N_VALIDATION
    trials = doc["trials"]
    assert sorted(t["trial"] for t in trials) == ["beta-0.3", "configured"]
    assert trials[0]["validation_accuracy"] >= trials[1]["validation_accuracy"]
    best = " ".join(f"--set {s}" for s in doc["best"]) or "the config as it is"
    assert doc["best"] == trials[0]["set"] and f"best: {best}" in out
    for t in trials:
        assert t["items"] == N_VALIDATION and t["method"] == "kto" and t["steps"] == SFT_STEPS + KTO_STEPS
        assert t["gain"] == pytest.approx(t["validation_accuracy"] - t["base_accuracy"])
    # The baselines are the run's own SFT (the whole budget) and RFT (from the recipe's SFT start),
    # scored on the same validation items; every trial is paired against each.
    baselines = {b["method"]: b for b in doc["baselines"]}
    assert sorted(baselines) == ["rft", "sft"] and all(b["steps"] == SFT_STEPS + KTO_STEPS for b in baselines.values())
    for t in trials:
        for method, baseline in baselines.items():
            vs = t["vs"][method]
            assert vs["items"] == N_VALIDATION
            assert vs["diff"] == pytest.approx(t["validation_accuracy"] - baseline["validation_accuracy"])


def test_a_kto_only_trial_trains_the_kto_step_alone_from_the_runs_sft_checkpoint(tuned):
    top, out, whole_loop, _ = tuned
    trial = top / "tune" / "beta-0.3"
    assert (trial / "recipe").is_symlink() and (trial / "recipe").resolve() == (top / "recipe").resolve()
    # The recipe's steps ran once, in `lossaverse run`; tune trained none of them again.
    ran = whole_loop["first"].stdout
    assert ran.count("recipe: sft (") == 1 and ran.count("recipe: the SFT'd target answers") == 1
    assert out.count("recipe: sft (") == 0 and out.count("recipe: the SFT'd target answers") == 0
    assert "(from the run's SFT checkpoint and on-policy answers)" in out
    train = json.loads((trial / "manifest.json").read_text())["stages"]["train"]
    assert train["steps"] == KTO_STEPS and train["recipe"]["sft_model"] == str((top / "recipe" / "sft" / "model").resolve())
    assert json.loads((trial / "manifest.json").read_text())["config"]["train"]["beta"] == 0.3
    # Its baselines are scored once, in `configured`: it scores the untrained target and its KTO alone.
    results = json.loads((trial / "eval" / "results.json").read_text())
    assert results["order"] == ["target-base", "target-kto"]
    assert not (trial / "compare").exists()
    configured = json.loads((top / "tune" / "configured" / "eval" / "results.json").read_text())
    assert set(configured["order"]) == {"target-base", f"target-sft-{CURVE_STEP}", "target-sft", "target-rft", "target-recipe-sft", "target-kto"}


def test_sfts_validation_curve_is_in_tune_json_and_the_report(tuned):
    top, out, *_ = tuned
    curve = json.loads((top / "tune.json").read_text())["sft_curve"]
    configured = json.loads((top / "tune" / "configured" / "eval" / "results.json").read_text())
    assert [(p["step"], p["model"]) for p in curve["points"]] == [(CURVE_STEP, f"target-sft-{CURVE_STEP}"), (SFT_STEPS, "target-recipe-sft"), (SFT_STEPS + KTO_STEPS, "target-sft")]
    for p in curve["points"]:
        assert p["accuracy"] == configured[p["model"]]["accuracy"]
    assert curve["stopped_gaining_at"] in (CURVE_STEP, SFT_STEPS, SFT_STEPS + KTO_STEPS) and curve["sft_steps"] == SFT_STEPS
    assert (top / "recipe" / "sft_curve" / f"step-{CURVE_STEP}" / "config.json").is_file()
    assert f"stopped gaining at step {curve['stopped_gaining_at']}" in out
    render_report(top)
    assert "## SFT's validation curve" in (top / "report.md").read_text() and (top / "report" / "sft_curve.png").is_file()


def test_the_eval_split_is_never_answered(tuned):
    top, _, _, before = tuned
    items = read_table(top / "items", ITEMS)
    validation = set(items.filter(pc.equal(items["split"], "validation"))["id"].to_pylist())
    train = set(items.filter(pc.equal(items["split"], "train"))["id"].to_pylist())
    evaluation = set(items.filter(pc.equal(items["split"], "eval"))["id"].to_pylist())
    assert len(validation) == N_VALIDATION and not validation & train
    assert set(read_table(top / "answers", ANSWERS)["id"].to_pylist()) == train
    fresh = set(read_table(top / "recipe" / "on_policy" / "answers", ANSWERS)["id"].to_pylist())
    assert len(fresh) == N_TRAIN and not fresh & (validation | evaluation | train)  # the recipe's fresh train items
    for trial in (top / "tune").iterdir():
        answers = read_table(trial / "eval" / "answers", ANSWERS)
        assert set(answers["split"].to_pylist()) == {"validation"} and set(answers["id"].to_pylist()) == validation
    assert _eval_state(top) == before  # tune scores nothing on the eval split: the run's eval/ is as it was
