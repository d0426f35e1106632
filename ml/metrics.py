"""Binary classification metrics shared by training (threshold choice) and evaluation."""

from __future__ import annotations

import numpy as np


def choose_threshold(
    y_true: np.ndarray, scores: np.ndarray, target_sensitivity: float = 0.90
) -> float:
    """The highest threshold whose sensitivity on (validation) data reaches the target.

    Highest, because among thresholds meeting the sensitivity target it gives
    the best specificity. Never call this with test data.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise ValueError("y_true and scores must be non-empty and the same length")
    if not y.any():
        raise ValueError("need at least one positive to choose a threshold")
    positives = np.sort(s[y])[::-1]
    # Predict positive when score >= threshold: keep ceil(target * P) positives above it.
    needed = int(np.ceil(target_sensitivity * positives.size))
    needed = min(max(needed, 1), positives.size)
    return float(positives[needed - 1])
