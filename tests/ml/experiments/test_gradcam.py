"""Tests for ml.experiments.gradcam: the reference Grad-CAM (the served CAMs are checked against it)."""


import keras
import numpy as np
import pytest

from ml.experiments.gradcam import grad_cam
from ml.model import build_resnet50
from ml.preprocess import preprocess_batch

SIZE = 96  # conv5_block3_out is 3x3 here; at 32 it would be a single, uninformative cell


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return build_resnet50(input_size=SIZE, seed=1)


def _batch(*seeds: int) -> np.ndarray:
    images = [np.random.default_rng(seed).random((128, 100), dtype=np.float32) for seed in seeds]
    return preprocess_batch(images, size=SIZE)


def test_heatmap_shape_and_range(model: keras.Model) -> None:
    heatmaps = grad_cam(model, _batch(1, 2))
    assert heatmaps.shape == (2, 3, 3) and heatmaps.dtype == np.float32
    assert np.isfinite(heatmaps).all()
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    # Normalised per image: each non-empty map peaks at exactly 1.
    for heatmap in heatmaps:
        assert heatmap.max() in (0.0, 1.0)


def test_heatmap_depends_on_the_image(model: keras.Model) -> None:
    first, second = grad_cam(model, _batch(1, 2))
    assert not np.allclose(first, second)
    # And it is per image: the same image gives the same map alone or in a batch.
    np.testing.assert_allclose(grad_cam(model, _batch(1))[0], first, atol=1e-4)


def test_no_gradient_gives_zeros_not_nan(model: keras.Model) -> None:
    head = model.get_layer("covid_probability")
    saved = head.get_weights()
    head.set_weights([np.zeros_like(w) for w in saved])
    try:
        heatmaps = grad_cam(model, _batch(3))
    finally:
        head.set_weights(saved)
    np.testing.assert_array_equal(heatmaps, np.zeros_like(heatmaps))


def test_unknown_layer_is_an_error(model: keras.Model) -> None:
    with pytest.raises(ValueError):
        grad_cam(model, _batch(1), layer_name="no_such_layer")
