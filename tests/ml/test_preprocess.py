"""Tests for ml.preprocess: the one preprocessing shared by training and serving."""

import numpy as np
import pytest

from ml.preprocess import IMAGENET_BGR_MEAN, PREPROCESS_VERSION, preprocess, preprocess_batch

MEAN = np.asarray(IMAGENET_BGR_MEAN, dtype=np.float32)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width), dtype=np.float32)


def test_shape_and_dtype() -> None:
    out = preprocess(_image(300, 200), size=64)
    assert out.shape == (64, 64, 3)
    assert out.dtype == np.float32


def test_deterministic() -> None:
    image = _image(123, 457)
    np.testing.assert_array_equal(preprocess(image, 32), preprocess(image.copy(), 32))


def test_white_image_is_255_minus_bgr_mean() -> None:
    out = preprocess(np.ones((50, 70), dtype=np.float32), size=32)
    np.testing.assert_allclose(out, np.broadcast_to(255.0 - MEAN, out.shape), atol=1e-3)


def test_black_image_is_minus_bgr_mean() -> None:
    out = preprocess(np.zeros((10, 10), dtype=np.float32), size=32)
    np.testing.assert_allclose(out, np.broadcast_to(-MEAN, out.shape), atol=1e-4)


def test_gray_is_replicated_before_mean_subtraction() -> None:
    out = preprocess(_image(80, 60), size=32)
    gray = out + MEAN
    np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=1e-3)
    np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-3)
    assert gray.min() >= -1e-3 and gray.max() <= 255.0 + 1e-3


@pytest.mark.parametrize("shape", [(1, 1), (17, 400), (224, 224), (1000, 800)])
def test_any_input_size(shape: tuple[int, int]) -> None:
    assert preprocess(_image(*shape), size=64).shape == (64, 64, 3)


def test_downscale_averages_instead_of_aliasing() -> None:
    # A 1-pixel checkerboard shrunk 8x must come out mid-gray, not a sampled 0 or 1.
    checker = (np.indices((256, 256)).sum(axis=0) % 2).astype(np.float32)
    gray = preprocess(checker, size=32)[..., 0] + MEAN[0]
    np.testing.assert_allclose(gray, 127.5, atol=2.0)


def test_integer_input_in_range_is_accepted() -> None:
    out = preprocess(np.ones((4, 4), dtype=np.uint8), size=32)
    np.testing.assert_allclose(out[0, 0], 255.0 - MEAN, atol=1e-3)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((8, 8, 3), dtype=np.float32), "2-D"),
        (np.zeros((8,), dtype=np.float32), "2-D"),
        (np.zeros((0, 8), dtype=np.float32), "empty"),
        (np.full((8, 8), np.nan, dtype=np.float32), "NaN"),
        (np.full((8, 8), np.inf, dtype=np.float32), "NaN or infinite"),
        (np.full((8, 8), 255.0, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((8, 8), dtype=bool), "dtype"),
    ],
)
def test_rejects_invalid_input(pixels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preprocess(pixels, size=32)


def test_batch_stacks_images_of_different_sizes() -> None:
    images = [_image(40, 50, 1), _image(300, 100, 2), _image(32, 32, 3)]
    batch = preprocess_batch(images, size=32)
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == np.float32
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], preprocess(image, 32))


def test_batch_rejects_empty_sequence() -> None:
    with pytest.raises(ValueError, match="no images"):
        preprocess_batch([], size=32)


def test_version_is_a_string() -> None:
    assert isinstance(PREPROCESS_VERSION, str) and PREPROCESS_VERSION
