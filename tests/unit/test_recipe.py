"""lossaverse.cluster.recipe: the recipe's datasets and its fresh items, without Ray."""

import pyarrow as pa
import pytest

from lossaverse.cluster.config import load_config
from lossaverse.cluster.recipe import on_policy_datasets, on_policy_items
from lossaverse.pipeline.data.build import kto_table
from lossaverse.pipeline.data.schemas import MARKED
from lossaverse.pipeline.models.tinymodels import build_tokenizer
from lossaverse.pipeline.sources.benchmarks import BenchmarkError, load_items
from tests.conftest import ROOT
from tests.unit.test_report import rows

PROMPT = "Q: What is 0 + 1?\nA:"


def cfg(*sets):
    return load_config(ROOT / "configs" / "tiny.yaml", ["benchmark.n_train=8", "benchmark.n_validation=4", "benchmark.n_eval=4", *sets])


def test_fresh_items_are_the_block_after_every_round_and_the_validation_items():
    c = cfg("rounds.count=2")
    fresh = on_policy_items(c)
    used = set()
    for k in (1, 2):
        items, _ = load_items(c.benchmark, c.seed, k)
        used |= set(items["id"].to_pylist())
    assert fresh.num_rows == 8 and set(fresh["split"].to_pylist()) == {"train"}
    assert not set(fresh["id"].to_pylist()) & used  # no validation, eval or round item
    third, _ = load_items(c.benchmark, c.seed, 3)  # the block a third round would answer
    assert set(fresh["id"].to_pylist()) == set(third.filter(pa.compute.equal(third["split"], "train"))["id"].to_pylist())


def test_more_on_policy_items_than_a_block_is_refused():
    with pytest.raises(BenchmarkError, match="train.on_policy.items=9, but the block of fresh train items holds 8"):
        on_policy_items(cfg("train.on_policy.items=9"))


def test_recipe_datasets_join_competitor_and_on_policy_rows_and_count_them():
    """4 on-policy answers, 1 right (accuracy 0.25); 3 competitor rows, 2 right: 7 rows, 3 desirable,
    every row tagged with the round."""
    marked = pa.Table.from_pylist(rows("target", "train", [True, False, False, False]), schema=MARKED)
    theirs = kto_table(pa.Table.from_pylist(rows("large", "train", [True, True, False]), schema=MARKED))
    kto, stats = on_policy_datasets(cfg(), marked, theirs, tokenizer=None)
    assert kto.num_rows == 7 and "round" in kto.column_names and set(kto["round"].to_pylist()) == {1}
    assert stats["labels"]["desirable"] == 3 and stats["labels"]["undesirable"] == 4
    assert stats["on_policy"] == {"answers": 4, "rows": 4, "desirable": 1, "accuracy": 0.25, "items": 4}
    assert stats["competitor_rows"] == 3 and "divergence" not in stats


def test_divergent_negatives_apply_to_the_on_policy_rows():
    marked = pa.Table.from_pylist(rows("target", "train", [True]) + rows("target", "train", [False]), schema=MARKED)
    tok = build_tokenizer([r["prompt"] + r["completion"] for r in marked.to_pylist()] * 20)
    theirs = kto_table(pa.Table.from_pylist(rows("large", "train", [True]), schema=MARKED))
    kto, stats = on_policy_datasets(cfg("datasets.divergent_negatives=true"), marked, theirs, tok)
    # " The answer is 0." against the right " The answer is 1.": everything up to the digit is shared.
    (wrong,) = [r for r in kto.to_pylist() if not r["label"]]
    assert wrong["prompt"] == PROMPT + " The answer is " and wrong["completion"] == "0."
    assert stats["divergence"]["split_rows"] == 1
    assert stats["divergence"]["penalised_tokens_after"] == 2 < stats["divergence"]["penalised_tokens_before"]


def test_rft_is_a_baseline_of_the_recipe_only():
    from lossaverse.cluster.config import ConfigError

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.compare=[kto, sft, rft]"])
    assert cfg.train.methods == ["kto", "sft", "rft"]
    with pytest.raises(ConfigError, match="train.compare rft starts from the recipe's SFT checkpoint.*set train.recipe: sft_then_kto"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.recipe=single", "train.compare=[kto, rft]"])
    with pytest.raises(ConfigError, match="unknown training method 'rtf'"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.compare=[kto, rtf]"])


def test_a_tune_trial_of_the_kto_steps_own_settings_has_the_runs_sft_and_on_policy_fingerprints(tmp_path):
    from lossaverse.cluster.recipe import step_fingerprints
    from lossaverse.cluster.stages import stage_fingerprints
    from lossaverse.cluster.tune import _trial_config, shares_recipe_start

    config = ROOT / "configs" / "local.yaml"
    run = load_config(config, [])
    shared = "sft" in run.train.methods

    def steps(c):
        return step_fingerprints(c, stage_fingerprints(c)["datasets"], shared)

    sets = ["train.nll_weight=1.0", "train.beta=0.3", "train.desirable_weight=1.5"]
    assert shares_recipe_start(run, sets)
    trial = _trial_config(config, [], sets, "t", tmp_path, ["sft"])
    assert trial.train.methods == ["kto", "sft"] and trial.evaluate.split == "validation"
    assert steps(trial) == steps(run)  # so the trial's recipe skips the linked SFT and on-policy steps
    # Anything the SFT step or the on-policy answers depend on is no shared trial, and would change them.
    for other in (["train.learning_rate=1e-3"], ["train.sft_steps=40"], ["train.on_policy.samples=8"],
                  ["datasets.divergent_negatives=true"], ["train.beta=0.3", "train.max_steps=8"]):
        assert not shares_recipe_start(run, other), other
        changed = steps(load_config(config, other))
        assert changed[2] != steps(run)[2] or other == ["train.beta=0.3", "train.max_steps=8"], other
    assert not shares_recipe_start(run, [])  # the config as it is: the run's own models
    # A trial exports no SFT curve (only `configured` scores the run's), so a grid of sft_steps fits it.
    assert trial.train.sft_curve == [] and run.train.sft_curve == [16, 32]
    assert _trial_config(config, [], ["train.sft_steps=16"], "s", tmp_path, []).train.sft_steps == 16
    assert _trial_config(config, [], [], "configured", tmp_path, run.train.compare, curve=True).train.sft_curve == [16, 32]
    assert not shares_recipe_start(cfg("train.recipe=single"), ["train.beta=0.3"])


def _curve_results(gain_64_over_48):
    """Validation results of the SFT run's points: 16 → 50%, 32 → 60%, 48 (the recipe's start) → 66%,
    64 (the SFT baseline) → 66% + the gain given. Pairs are stored later-evaluated minus earlier, as
    evaluate orders them (base, the curve, sft, recipe-sft), so 48 − 64 is stored and 64 − 48 is read flipped."""
    acc = {"target-sft-16": 0.50, "target-sft-32": 0.60, "target-sft": 0.66 + gain_64_over_48[0], "target-recipe-sft": 0.66}
    results = {m: {"accuracy": a, "ci95": [a - 0.05, a + 0.05]} for m, a in acc.items()}

    def pair(model, baseline, diff, ci):
        return {"model": model, "baseline": baseline, "diff": diff, "ci95": ci, "mcnemar_p": 0.01}

    results["pairs"] = [pair("target-sft-32", "target-sft-16", 0.10, [0.05, 0.15]),
                        pair("target-sft", "target-sft-16", 0.16, [0.1, 0.2]), pair("target-sft", "target-sft-32", 0.06, [0.01, 0.1]),
                        pair("target-recipe-sft", "target-sft-16", 0.16, [0.1, 0.2]),
                        pair("target-recipe-sft", "target-sft-32", 0.06, [0.02, 0.10]),
                        pair("target-recipe-sft", "target-sft", -gain_64_over_48[0], [-gain_64_over_48[2], -gain_64_over_48[1]])]
    return results


def test_sft_stopped_gaining_at_the_first_step_no_later_step_beats_on_validation():
    from lossaverse.cluster.tune import sft_curve

    c = load_config(ROOT / "configs" / "local.yaml", ["train.sft_curve=[16, 32]"])
    flat = sft_curve(c, _curve_results((0.01, -0.01, 0.03)))  # 64 − 48: +1.0 [−1.0, +3.0]
    assert [p["step"] for p in flat["points"]] == [16, 32, 48, 64] and flat["sft_steps"] == 48
    assert flat["stopped_gaining_at"] == 48
    assert flat["points"][3]["vs_previous"]["diff"] == pytest.approx(0.01)
    assert flat["points"][3]["vs_previous"]["ci95"] == pytest.approx([-0.01, 0.03])  # read flipped from 48 − 64
    assert "vs_previous" not in flat["points"][0]
    rising = sft_curve(c, _curve_results((0.03, 0.01, 0.05)))  # 64 − 48: +3.0 [+1.0, +5.0]: still gaining
    assert rising["stopped_gaining_at"] == 64


def test_sft_curve_steps_are_checked_against_the_sft_run():
    with pytest.raises(Exception, match=r"train.sft_curve \[48\]: each step once, inside the SFT run's 64 steps"):
        load_config(ROOT / "configs" / "local.yaml", ["train.sft_curve=[48]"])
    with pytest.raises(Exception, match=r"inside the SFT run's 64 steps"):
        load_config(ROOT / "configs" / "local.yaml", ["train.sft_curve=[16, 64]"])
    # Without the recipe there is no SFT run to export: the default job's curve does not stop `recipe=single`
    # (its train.negatives does, with the fix named: tests/unit/test_train.py).
    single = ["train.recipe=single", "train.compare=[kto, sft]", "train.negatives=all"]
    assert load_config(ROOT / "configs" / "local.yaml", single).train.recipe == "single"
    assert load_config(ROOT / "configs" / "local.yaml", ["train.sft_curve=[32, 16]"]).train.sft_curve == [32, 16]


def test_the_kto_steps_own_settings_are_the_fields_the_train_config_marks():
    """KTO_STEP_ONLY is derived from TrainConfig (fields marked KTO_STEP), not kept by hand."""
    from lossaverse.cluster.recipe import KTO_STEP_ONLY
    from lossaverse.training.config import KTO_STEP, TrainConfig

    assert KTO_STEP_ONLY == {"beta", "weights", "desirable_weight", "undesirable_weight", "loss_aversion", "nll_weight",
                             "negatives", "precompute_ref_log_probs"}
    assert TrainConfig.model_fields["learning_rate"].json_schema_extra != KTO_STEP  # shared by every step
