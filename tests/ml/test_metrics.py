"""Threshold choice on validation scores."""

import numpy as np
import pytest

from ml.metrics import choose_threshold


def test_threshold_reaches_target_sensitivity_with_best_specificity():
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1, 0.35, 0.2, 0.05])
    t = choose_threshold(y, s, target_sensitivity=0.9)
    assert t == pytest.approx(0.3)  # 9 of 10 positives at or above it
    assert (s[y == 1] >= t).mean() >= 0.9
    assert choose_threshold(y, s, target_sensitivity=1.0) == pytest.approx(0.1)
    assert choose_threshold(y, s, target_sensitivity=0.5) == pytest.approx(0.7)


def test_threshold_needs_positives_and_matching_lengths():
    with pytest.raises(ValueError):
        choose_threshold(np.array([0, 0]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        choose_threshold(np.array([1]), np.array([0.1, 0.2]))
