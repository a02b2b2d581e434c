"""Statistics over per-item metric scores: the paired permutation test the evaluation and the ablations report, and
the mean with its sample standard deviation over seeds."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def paired_permutation_test(a: Sequence[float], b: Sequence[float], n_permutations: int = 10000,
                            seed: int = 0) -> float:
    """Two-sided p-value of mean(a - b) = 0 by random sign flips of the paired differences (exact when the pairs
    are few enough to enumerate). Returns 1.0 when every difference is 0."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.shape[0] == 0:
        raise ValueError("no pairs")
    observed = abs(d.mean())
    if not np.any(d):
        return 1.0
    rng = np.random.default_rng(seed)
    if d.shape[0] <= 16:
        signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * d.shape[0])).reshape(d.shape[0], -1).T
    else:
        signs = rng.choice([-1.0, 1.0], size=(n_permutations, d.shape[0]))
    null = np.abs((signs * d).mean(axis=1))
    # +1 in numerator and denominator for the sampled case: the observed assignment is one of the permutations
    if d.shape[0] <= 16:
        return float(np.mean(null >= observed - 1e-12))
    return float((np.sum(null >= observed - 1e-12) + 1) / (n_permutations + 1))


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    values = [float(v) for v in values]
    if not values:
        return float("nan"), None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)
