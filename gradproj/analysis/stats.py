"""Statistics over the per-test-example metric values: medians, bootstrap CIs, permutation tests."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PermutationResult:
    """Two-sided permutation test of median(a) - median(b)."""

    median_difference: float
    p_value: float
    n_permutations: int


def median_difference_permutation_test(
    a: np.ndarray, b: np.ndarray, n_permutations: int = 1000, seed: int = 0
) -> PermutationResult:
    """Permutation test of the difference of medians between two groups, as in the original study.

    The pooled values are reshuffled between the groups (group sizes kept) `n_permutations` times
    with a generator seeded by `seed`; p = (1 + #{|d_perm| >= |d_obs|}) / (1 + n_permutations),
    which never reports p = 0 from a finite sample of permutations.
    """
    a, b = _finite(a), _finite(b)
    observed = np.median(a) - np.median(b)
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.broadcast_to(pooled, (n_permutations, pooled.size)), axis=1)
    null = np.median(shuffled[:, : a.size], axis=1) - np.median(shuffled[:, a.size :], axis=1)
    # Tolerance so that permutations reproducing the observed split count as "as extreme".
    extreme = np.abs(null) >= np.abs(observed) - 1e-12
    p_value = (1 + extreme.sum()) / (1 + n_permutations)
    return PermutationResult(float(observed), float(p_value), n_permutations)


def bootstrap_median_ci(
    values: np.ndarray, n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the median (resampling test examples)."""
    return bootstrap_ci(values, np.median, n_resamples, level, seed)


def bootstrap_ci(
    values: np.ndarray, statistic=np.mean, n_resamples: int = 2000, level: float = 0.95, seed=0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of `statistic(values, axis=...)`."""
    values = _finite(values)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    resampled = rng.choice(values, size=(n_resamples, values.size), replace=True)
    estimates = statistic(resampled, axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return float(low), float(high)


def summarize(values: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """n, median, mean and the 95% bootstrap CI of the median of the finite values."""
    finite = _finite(values)
    low, high = bootstrap_median_ci(finite, n_resamples=n_resamples, seed=seed)
    empty = finite.size == 0
    return {
        "n": int(finite.size),
        "median": float("nan") if empty else float(np.median(finite)),
        "mean": float("nan") if empty else float(np.mean(finite)),
        "ci_low": low,
        "ci_high": high,
    }


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]
