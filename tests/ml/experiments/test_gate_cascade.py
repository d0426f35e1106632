"""ml.experiments.gate_cascade: the limits under which the classifier's features clear an image."""

from __future__ import annotations

import numpy as np
import pytest

from ml.experiments.gate_cascade import accept_rule, logit


def test_the_rule_keeps_every_non_radiograph_out_by_the_margin() -> None:
    # Radiographs: distances 0.1 .. 1.0, all confidently frontal (logit 6). One lateral film at
    # distance 0.55 that the classifier also calls frontal (logit 5), one photo far out.
    d_rad = np.linspace(0.1, 1.0, 10)
    p = np.r_[np.full(10, 1 / (1 + np.exp(-6.0))), 1 / (1 + np.exp(-5.0)), 0.9]
    d = np.r_[d_rad, 0.55, 5.0]
    radiograph = np.r_[np.ones(10, bool), False, False]
    quantiles = np.linspace(0.1, 1.0, 19)
    # Margin 0: the P(frontal) limit at the lateral film's logit clears every radiograph.
    min_lp, max_d, cleared = accept_rule(p, d, radiograph, 0.0, quantiles)
    assert min_lp == pytest.approx(5.0) and max_d == pytest.approx(1.0) and cleared == 1.0
    # Margin 2: logit 5 + 2 > 6, so only the distance can keep the lateral film out.
    min_lp, max_d, cleared = accept_rule(p, d, radiograph, 2.0, quantiles)
    assert max_d < 0.55 and cleared == pytest.approx(0.5)
    assert not ((logit(p[10]) >= min_lp) and (d[10] <= max_d))
