"""The statistics the evaluation and the ablations report (lm_lexicon.metrics.statistics)."""
from __future__ import annotations

import numpy as np
import pytest

from lm_lexicon.metrics.statistics import mean_std, paired_permutation_test


def test_permutation_test_exact_small_sample():
    # 4 positive differences: of the 16 sign patterns only all-plus and all-minus reach |mean| = 1 -> p = 2/16
    assert paired_permutation_test([2, 2, 2, 2], [1, 1, 1, 1]) == pytest.approx(2 / 16)
    assert paired_permutation_test([1, 2, 3], [1, 2, 3]) == 1.0
    # symmetric in the arguments
    a, b = [0.3, 0.9, 0.1, 0.5, 0.7], [0.2, 0.4, 0.3, 0.1, 0.6]
    assert paired_permutation_test(a, b) == paired_permutation_test(b, a)


def test_permutation_test_large_sample_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    assert paired_permutation_test(base + 0.3, base + rng.normal(scale=0.5, size=400)) < 0.01
    noise = rng.normal(size=400)
    assert paired_permutation_test(noise, rng.permutation(noise)) > 0.05
    with pytest.raises(ValueError):
        paired_permutation_test([], [])


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, None)
