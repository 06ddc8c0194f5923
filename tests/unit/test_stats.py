"""Known-answer cases for the statistics helpers, worked by hand in pipeline/data/stats.py's docstrings."""

import math

import pytest

from lossaverse.pipeline.data.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap_diff, wilson_interval


def test_wilson_interval_for_8_of_10_matches_the_hand_computation():
    lo, hi = wilson_interval(8, 10)
    assert math.isclose(lo, 0.49016, abs_tol=5e-5) and math.isclose(hi, 0.94332, abs_tol=5e-5)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and math.isclose(hi, 0.16113, abs_tol=5e-5)  # z²/(n+z²) = 3.8415/23.8415
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and math.isclose(lo, 1 - 0.16113, abs_tol=5e-5)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(3, 2)


def test_mcnemar_exact_known_values():
    assert math.isclose(mcnemar_exact(1, 9), 0.021484375)  # 2 * 11/1024
    assert math.isclose(mcnemar_exact(9, 1), 0.021484375)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    assert math.isclose(mcnemar_exact(0, 5), 2 / 32)  # 2 * (1/2)^5
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_bootstrap_ci_of_two_zeros_two_ones_spans_zero_to_one():
    assert bootstrap_ci([0, 0, 1, 1], n_boot=4000, seed=0) == (0.0, 1.0)


def test_bootstrap_ci_is_deterministic_by_seed_and_degenerate_for_constants():
    values = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 5
    assert bootstrap_ci(values, 500, seed=3) == bootstrap_ci(values, 500, seed=3)
    lo, hi = bootstrap_ci(values, 2000, seed=1)
    assert lo < 0.7 < hi and hi - lo < 0.3
    assert bootstrap_ci([1, 1, 1], 100, 0) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([], 10, 0)


def test_paired_bootstrap_diff():
    out = paired_bootstrap_diff([1, 1, 1, 1], [0, 0, 0, 0], 200, 0)
    assert out == {"diff": 1.0, "low": 1.0, "high": 1.0}
    out = paired_bootstrap_diff([1, 0] * 20, [0, 1] * 20, 1000, 0)
    assert out["diff"] == 0.0 and out["low"] < 0 < out["high"]
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap_diff([1], [1, 0])
