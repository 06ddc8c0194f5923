"""Evaluation statistics on marked rows: known answers worked out by hand in each docstring."""

import math
import random

import pyarrow as pa
import pytest

from lossaverse.pipeline.data.schemas import MARKED
from lossaverse.pipeline.report.evalstats import compare, default_order, evaluation_results, item_scores, model_accuracy, model_label, models_of


def marked(verdicts: dict[str, list], samples: int = 1) -> pa.Table:
    """Marked eval rows: verdicts[name][i] is item i's verdict (a list of `samples` verdicts when samples > 1)."""
    rows = []
    for name, per_item in verdicts.items():
        for i, v in enumerate(per_item):
            for s, ok in enumerate(v if samples > 1 else [v]):
                rows.append({"id": f"q{i:03d}", "question": f"{i} + 1?", "reference": str(i + 1), "kind": "numeric",
                             "choices": None, "split": "eval", "source": "builtin", "competitor": name, "model": f"/models/{name}",
                             "sample": s, "prompt": f"Q: {i} + 1?", "completion": f" {i + 1 if ok else 0}", "finish_reason": "stop",
                             "completion_tokens": 3, "error": None, "correct": bool(ok), "extracted": str(i + 1 if ok else 0),
                             "reason": "match" if ok else "mismatch", "marked_by": "rules"})
    return pa.Table.from_pylist(rows, schema=MARKED)


def test_mcnemar_on_items_b1_c9():
    """10 items, all discordant: the model right on 1 the baseline missed, the baseline right on 9.
    Exact two-sided p = 2 * sum_{k<=1} C(10,k) / 2^10 = 2 * 11/1024 = 0.021484375; diff = (1 - 9)/10 = -0.8."""
    model = {f"q{i}": float(i == 0) for i in range(10)}
    baseline = {f"q{i}": float(i != 0) for i in range(10)}
    out = compare(model, baseline, n_boot=500, seed=0)
    assert (out["model_better"], out["baseline_better"], out["ties"], out["items"]) == (1, 9, 0, 10)
    assert math.isclose(out["mcnemar_p"], 0.021484375)
    assert math.isclose(out["diff"], -0.8)
    assert out["ci95"][0] <= -0.8 <= out["ci95"][1] < 0


def test_equal_discordant_counts_give_p_one():
    """b = c = 3 (plus 4 ties): the binomial tail at min(b, c) is >= 1/2, so p = min(1, 2 * tail) = 1."""
    model = {f"q{i}": v for i, v in enumerate([1, 1, 1, 0, 0, 0, 1, 0, 1, 0])}
    baseline = {f"q{i}": v for i, v in enumerate([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])}
    out = compare(model, baseline, n_boot=200)
    assert (out["model_better"], out["baseline_better"], out["ties"]) == (3, 3, 4)
    assert out["mcnemar_p"] == 1.0 and out["diff"] == 0.0


def test_identical_models_differ_by_exactly_zero():
    """The per-item differences are all 0, so every resampled mean is 0: CI [0, 0], no discordant item, p = 1."""
    table = marked({"target-base": [1, 0, 1, 1, 0], "target-kto": [1, 0, 1, 1, 0]})
    (pair,) = evaluation_results(table, n_boot=300)["pairs"]
    assert pair["diff"] == 0.0 and pair["ci95"] == [0.0, 0.0] and pair["mcnemar_p"] == 1.0 and pair["ties"] == 5


def test_bootstrap_ci_of_a_constant_model_is_a_point():
    """Every item right: each resample's mean is 1, so the interval collapses to [1, 1]."""
    assert model_accuracy({"a": 1.0, "b": 1.0, "c": 1.0}, n_boot=100) == {"accuracy": 1.0, "items": 3, "ci95": [1.0, 1.0]}
    assert model_accuracy({"a": 0.0, "b": 0.0}, n_boot=100)["ci95"] == [0.0, 0.0]


def test_results_are_reproducible_by_seed_and_independent_of_row_order():
    rng = random.Random(7)
    verdicts = {"target-base": [rng.random() < 0.3 for _ in range(60)], "target-kto": [rng.random() < 0.5 for _ in range(60)]}
    table = marked(verdicts)
    shuffled = table.take(pa.array(rng.sample(range(table.num_rows), table.num_rows)))
    first = evaluation_results(table, seed=3)
    assert first == evaluation_results(table, seed=3)
    assert first == evaluation_results(shuffled, seed=3)  # Ray Data may write rows in any order
    other = evaluation_results(table, seed=4)
    assert other["target-kto"]["accuracy"] == first["target-kto"]["accuracy"]
    assert other["target-kto"]["ci95"] != first["target-kto"]["ci95"]  # the seed, not chance, fixes the interval


def test_headline_numbers_of_a_two_model_evaluation():
    """20 items. Base right on q000-q003 and q019 (5/20 = 0.25); KTO right on q000-q008 (9/20 = 0.45).
    Discordant: KTO only on q004-q008 (b=5), base only on q019 (c=1): p = 2 * (1 + 6)/2^6 = 0.21875;
    diff = 0.45 - 0.25 = +0.20."""
    base = [i < 4 or i == 19 for i in range(20)]
    kto = [i < 9 for i in range(20)]
    res = evaluation_results(marked({"target-kto": kto, "target-base": base}), order=["target-base", "target-kto"], seed=0)
    assert list(models_of(res)) == ["target-base", "target-kto"]
    b, k = res["target-base"], res["target-kto"]
    assert (b["accuracy"], b["correct"], b["answers"], b["items"]) == (0.25, 5, 20, 20)
    assert (k["accuracy"], k["correct"], k["answers"], k["items"]) == (0.45, 9, 20, 20)
    assert b["ci95"][0] < 0.25 < b["ci95"][1] and k["ci95"][0] < 0.45 < k["ci95"][1]
    assert k["reasons"]["match"] == 9 and k["reasons"]["mismatch"] == 11 and k["model"] == "/models/target-kto"
    (pair,) = res["pairs"]
    assert (pair["model"], pair["baseline"]) == ("target-kto", "target-base")
    assert math.isclose(pair["diff"], 0.20) and pair["ci95"][0] < 0.20 < pair["ci95"][1]
    assert (pair["model_better"], pair["baseline_better"], pair["ties"]) == (5, 1, 14)
    assert math.isclose(pair["mcnemar_p"], 0.21875)
    assert res["statistics"]["seed"] == 0 and res["statistics"]["n_boot"] == 2000


def test_several_samples_are_averaged_per_item_first():
    """Item q000: base 1 of 2 right (0.5), kto 2 of 2 (1.0); q001: both 0 of 2; q002: base 2 of 2, kto 1 of 2.
    Accuracy base = (0.5 + 0 + 1)/3 = 0.5, kto = (1 + 0 + 0.5)/3 = 0.5; per-item sign test:
    kto better on q000, base on q002, q001 tied -> b = c = 1, p = 1."""
    table = marked({"target-base": [[1, 0], [0, 0], [1, 1]], "target-kto": [[1, 1], [0, 0], [1, 0]]}, samples=2)
    assert item_scores(table)["target-base"] == {"q000": 0.5, "q001": 0.0, "q002": 1.0}
    res = evaluation_results(table, n_boot=200)
    assert res["target-base"]["items"] == 3 and res["target-base"]["answers"] == 6
    assert res["target-base"]["samples_per_item"] == 2.0
    assert res["target-base"]["accuracy"] == 0.5 == res["target-kto"]["accuracy"]
    (pair,) = res["pairs"]
    assert (pair["model_better"], pair["baseline_better"], pair["ties"], pair["mcnemar_p"]) == (1, 1, 1, 1.0)


def test_every_later_model_is_paired_with_every_earlier_one():
    table = marked({"target-sft": [1, 0, 0], "target-kto": [1, 1, 0], "target-base": [0, 0, 0], "target-dpo": [1, 1, 1]})
    res = evaluation_results(table, order=["target-base", "target-kto", "target-dpo", "target-sft"], n_boot=100)
    assert [(p["model"], p["baseline"]) for p in res["pairs"]] == [
        ("target-kto", "target-base"), ("target-dpo", "target-base"), ("target-dpo", "target-kto"),
        ("target-sft", "target-base"), ("target-sft", "target-kto"), ("target-sft", "target-dpo")]
    assert default_order(["target-kto", "target-base", "target-dpo"]) == ["target-base", "target-dpo", "target-kto"]


def test_bad_input_names_the_problem():
    table = marked({"target-base": [1, 0]})
    with pytest.raises(ValueError, match=r"missing column\(s\) \['correct'\]"):
        item_scores(table.drop(["correct"]))
    with pytest.raises(ValueError, match=r"no marked eval rows for model\(s\) \['target-kto'\]"):
        evaluation_results(table, order=["target-base", "target-kto"])
    with pytest.raises(ValueError, match="no item in common"):
        compare({"a": 1.0}, {"b": 0.0})


def test_labels_and_model_entries():
    assert model_label("target-base") == "target before training"
    assert model_label("target-kto") == "target after KTO"
    assert model_label("large") == "large"
    assert list(models_of({"a": {"accuracy": 0.1}, "pairs": [], "statistics": {"seed": 0}, "rounds": []})) == ["a"]
