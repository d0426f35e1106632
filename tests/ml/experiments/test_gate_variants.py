"""ml.experiments.gate_variants: the energy score and the nearest-centroid distances."""

from __future__ import annotations

import numpy as np
import pytest

from ml.experiments.gate_variants import energy, nearest_centroid, within_source


def test_energy_is_the_two_logit_energy_and_falls_as_p_covid_rises() -> None:
    p = np.array([0.01, 0.5, 0.99])
    z = np.log(p / (1 - p))
    np.testing.assert_allclose(energy(p), -np.log(np.exp(0.0) + np.exp(z)), rtol=1e-9)
    assert energy(np.array([0.0]))[0] == pytest.approx(0.0, abs=1e-6)  # clipped, finite
    assert np.all(np.diff(energy(np.linspace(0.01, 0.99, 50))) < 0)


def test_nearest_centroid_takes_the_closest_source() -> None:
    centroids = np.array([[0.0, 0.0], [10.0, 0.0]])
    z = np.array([[1.0, 0.0], [9.0, 0.0], [5.0, 0.0]])
    np.testing.assert_allclose(nearest_centroid(z, centroids), [0.5, 0.5, 12.5])


def test_within_source_whitening_brings_a_distinct_source_home() -> None:
    # Two sources far apart, each tight: pooled, a new image of the second source looks like
    # an outlier of the whole; measured from its own source's mean it is ordinary.
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (200, 6)), rng.normal(0, 1, (40, 6)) + 8.0
    features = np.concatenate([a, b, rng.normal(0, 1, (5, 6)) + 8.0, rng.normal(0, 1, (5, 6)) + 30])
    sources = np.array(["a"] * 200 + ["b"] * 40 + ["b"] * 5 + ["?"] * 5)
    fit = np.arange(len(features)) < 240
    d = within_source(features, fit, sources, components=6)
    assert d[240:245].max() < 3.0  # new images of source b: about one unit per axis
    assert d[245:].min() > 50.0  # far from every source

