"""Statistics for accuracies: confidence intervals and paired tests, shared by stats.json and evaluation.

- `wilson_interval(k, n)`: the Wilson score interval for a proportion (Wilson, 1927):
  (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), with p = k/n.
- `bootstrap_ci(values, n_boot, seed)`: the percentile bootstrap interval of a mean, resampling items
  (Efron & Tibshirani, 1993, ch. 13). Resample items, not answers: the answers to one item are not
  independent.
- `paired_bootstrap_diff(a, b, n_boot, seed)`: the same for mean(a - b) over paired items.
- `mcnemar_exact(b, c)`: McNemar's exact test on the discordant pairs (b: only the first right,
  c: only the second): two-sided binomial p = min(1, 2 * P[X <= min(b, c)]), X ~ Bin(b + c, 1/2).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson interval for k successes in n trials; (0, 1) when n == 0.

    Worked by hand for k=8, n=10 (z²=3.84146): centre (0.8 + 0.192073)/1.384146 = 0.716740,
    half-width 1.959964·sqrt(0.016 + 0.0096037)/1.384146 = 0.226578, so (0.49016, 0.94332).
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentiles(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item `values` (deterministic by seed).

    Worked by hand for [0, 0, 1, 1]: a resampled mean is 0 with probability (1/2)^4 = 0.0625 and
    1 with probability 0.0625, both above 0.025, so the 95% interval is (0.0, 1.0).
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return _percentiles(means, alpha)


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                          alpha: float = 0.05) -> dict:
    """mean(a - b) over paired items with its percentile bootstrap interval (items resampled together)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired_bootstrap_diff needs two equal, non-empty sequences; got {x.size} and {y.size}")
    lo, hi = bootstrap_ci(x - y, n_boot, seed, alpha)
    return {"diff": float((x - y).mean()), "low": lo, "high": hi}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs.

    Worked by hand for b=1, c=9: n=10, P[X <= 1] = (1 + 10)/1024 = 0.0107422, so p = 0.0214844.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
