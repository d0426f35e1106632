"""Tests for ml.preprocess: the one preprocessing shared by training and serving."""

import subprocess
import sys
import time

import numpy as np
import pytest

from ml.imaging import decode_image
from ml.preprocess import (
    IMAGENET_BGR_MEAN,
    PREPROCESS_VERSION,
    SERVED_PREPROCESS_VERSIONS,
    crop_borders,
    preprocess,
    preprocess_batch,
    preprocess_gray,
    register_version,
    to_caffe,
)
from tests.conftest import REPO, fixture_bytes

MEAN = np.asarray(IMAGENET_BGR_MEAN, dtype=np.float32)
VERSIONS = pytest.mark.parametrize("version", SERVED_PREPROCESS_VERSIONS)


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


# --- versions ------------------------------------------------------------------------------

# preprocess(_smooth_image(), 8, version="1") grey levels, computed with the version 1 code
# before version 2 existed: a model trained with "1" must keep seeing exactly this.
V1_EXPECTED_GRAY = [
    [205.293, 185.490, 149.288, 111.984, 88.029, 86.363, 108.330, 140.993],
    [237.333, 217.530, 181.328, 144.024, 120.069, 118.403, 140.370, 173.033],
    [247.149, 227.346, 191.144, 153.840, 129.885, 128.219, 150.186, 182.849],
    [224.835, 205.032, 168.830, 131.526, 107.571, 105.905, 127.872, 160.535],
    [181.907, 162.105, 125.903, 88.599, 64.644, 62.978, 84.945, 117.607],
    [142.271, 122.468, 86.266, 48.962, 25.007, 23.341, 45.308, 77.971],
    [126.382, 106.579, 70.377, 33.073, 9.118, 7.452, 29.419, 62.082],
    [139.511, 119.709, 83.507, 46.202, 22.247, 20.582, 42.549, 75.211],
]


def _smooth_image() -> np.ndarray:
    i, j = np.indices((20, 30))
    return ((np.sin(i * 0.3) + np.cos(j * 0.17) + 2.0) / 4.0).astype(np.float32)


def _xray() -> np.ndarray:
    return decode_image(fixture_bytes("hannover__0957ce54.png")).pixels


def test_versions() -> None:
    assert SERVED_PREPROCESS_VERSIONS == ("1", "2")
    assert PREPROCESS_VERSION == "2"


def test_serving_alone_knows_only_the_served_versions() -> None:
    # A fresh interpreter that never imports ml.experiments (as a worker) cannot compute v3/v4.
    code = (
        "import ml.preprocess as p, numpy as n, sys\n"
        "print(p.supported_versions())\n"
        "try: p.preprocess_gray(n.zeros((8, 8), n.float32), 8, version='3')\n"
        "except ValueError as e: print('refused', e)\n"
        "print('scipy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "('1', '2')" and out[1].startswith("refused unknown preprocess version")
    assert out[2] == "False"


def test_served_versions_cannot_be_replaced() -> None:
    with pytest.raises(ValueError, match="served"):
        register_version("2", lambda arr: arr)


def test_version_1_is_unchanged() -> None:
    out = preprocess(_smooth_image(), 8, version="1")
    np.testing.assert_allclose(out[..., 0] + MEAN[0], V1_EXPECTED_GRAY, atol=1e-3)
    np.testing.assert_allclose(out + MEAN, np.repeat(out[..., :1] + MEAN[0], 3, -1), atol=1e-3)


@pytest.mark.parametrize("version", ["0", "5", "99", "", 2])
def test_unknown_version_is_refused(version: object) -> None:
    with pytest.raises(ValueError, match="preprocess version"):
        preprocess(_image(40, 40), 32, version=version)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="preprocess version"):
        preprocess_batch([_image(40, 40)], 32, version=version)  # type: ignore[arg-type]


@VERSIONS
def test_gray_then_caffe_is_preprocess(version: str) -> None:
    # Training caches preprocess_gray() and applies to_caffe() per batch: it must be exact.
    image = _xray()
    np.testing.assert_array_equal(
        to_caffe(preprocess_gray(image, 64, version=version)),
        preprocess(image, 64, version=version),
    )


@VERSIONS
def test_batch_uses_the_version(version: str) -> None:
    images = [_xray(), _image(50, 60)]
    batch = preprocess_batch(images, 32, version=version)
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], preprocess(image, 32, version=version))


def test_version_2_is_deterministic_and_differs_from_1() -> None:
    image = _xray()
    v2 = preprocess(image, 64, version="2")
    np.testing.assert_array_equal(v2, preprocess(image.copy(), 64, version="2"))
    assert np.abs(v2 - preprocess(image, 64, version="1")).mean() > 5.0


@pytest.mark.parametrize("frame_value", [0.0, 1.0, 0.02])
def test_version_2_removes_a_uniform_frame(frame_value: float) -> None:
    image = _xray()
    h, w = image.shape
    noise = np.random.default_rng(0).normal(0.0, 0.003, (h + 60, w + 70)).astype(np.float32)
    framed = np.clip(frame_value + noise, 0.0, 1.0)
    framed[30 : 30 + h, 40 : 40 + w] = image
    v2_plain, v2_framed = (preprocess_gray(x, 64, version="2") for x in (image, framed))
    assert np.abs(v2_framed - v2_plain).mean() < 3.0  # of 255 grey levels
    # Not vacuous: version 1 keeps the frame, and it shows.
    v1_plain, v1_framed = (preprocess_gray(x, 64, version="1") for x in (image, framed))
    assert np.abs(v1_framed - v1_plain).mean() > 20.0


def test_crop_is_capped_at_15_percent_per_side() -> None:
    flat = np.full((100, 200), 0.5, dtype=np.float32)
    assert crop_borders(flat).shape == (70, 140)
    # Anatomy (here: noise) reaching the edge is kept whole.
    busy = _image(100, 200)
    assert crop_borders(busy).shape == (100, 200)


def test_version_2_equalises_a_low_contrast_image() -> None:
    dull = (0.45 + 0.1 * _xray()).astype(np.float32)  # the X-ray squeezed into 10% of the range
    v1, v2 = (preprocess_gray(dull, 64, version=v) for v in ("1", "2"))
    assert np.ptp(v1) < 30.0
    assert np.percentile(v2, 99) - np.percentile(v2, 1) > 200.0
    # Roughly flat histogram: each quarter of the grey range holds 10-50% of pixels (the
    # squeezed image has only ~26 grey levels, so it cannot be perfectly flat).
    shares = np.histogram(v2, bins=4, range=(0, 255))[0] / v2.size
    assert shares.min() > 0.10 and shares.max() < 0.50


def test_version_2_handles_constant_and_tiny_images() -> None:
    for image in (np.zeros((40, 40)), np.full((5, 3), 0.5), np.ones((1, 1))):
        out = preprocess(image.astype(np.float32), 32, version="2")
        assert out.shape == (32, 32, 3) and np.isfinite(out).all()


def test_version_2_is_fast_on_a_full_size_upload() -> None:
    # A realistic 3000x3000 upload; the budget is 80 ms, asserted loosely against noisy CI.
    big = np.asarray(np.kron(_xray()[:250, :250], np.ones((12, 12), np.float32)), dtype=np.float32)
    preprocess(big, 224, version="2")
    start = time.perf_counter()
    out = preprocess(big, 224, version="2")
    assert time.perf_counter() - start < 0.4
    assert out.shape == (224, 224, 3)


def _plain_equalize(arr: np.ndarray) -> np.ndarray:
    """Version 2's equalisation written the obvious way (the formula the model was trained on)."""
    bins = np.minimum((arr * 255 + 0.5).astype(np.intp), 255)
    cdf = np.cumsum(np.bincount(bins.ravel(), minlength=256))
    lowest = cdf[bins.min()]
    if cdf[-1] == lowest:
        return arr
    return ((cdf - lowest) / (cdf[-1] - lowest)).clip(0.0, 1.0).astype(np.float32)[bins]


def test_fast_steps_equal_the_plain_formulas() -> None:
    """The served steps are written for speed (one pass fewer, uint8 bins, a plane at a time);
    their outputs must stay bit for bit those of the plain formulas on real and odd images."""
    from ml.preprocess import _validate, border_cropped, equalize, histogram_bins

    rng = np.random.default_rng(3)
    images = [decode_image(fixture_bytes(name)).pixels for name in
              ("cxnet__681.png", "hannover__0957ce54.png", "hannover__3a81faf3.png")]
    images += [rng.random((300, 200), dtype=np.float32), np.zeros((20, 30), np.float32),
               np.ones((40, 10), np.float32), np.full((9, 9), 0.5, np.float32),
               np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)]
    for image in images:
        checked = _validate(image)
        assert np.array_equal(checked, np.clip(image.astype(np.float32), 0.0, 1.0))
        cropped = border_cropped(checked)
        bins = histogram_bins(cropped)
        assert bins.dtype == np.uint8
        assert np.array_equal(bins, np.minimum((cropped * 255 + 0.5).astype(np.intp), 255))
        assert np.array_equal(equalize(cropped), _plain_equalize(cropped))
        gray = preprocess_gray(image)
        assert np.array_equal(to_caffe(gray), np.stack([gray] * 3, axis=-1) - MEAN)
        assert np.array_equal(preprocess_batch([image, image])[1], preprocess(image))


def test_validation_clips_only_round_off_and_never_writes_into_the_input() -> None:
    from ml.preprocess import _validate

    overshoot = np.array([[-0.0005, 0.5], [1.0004, 1.0]], np.float32)
    before = overshoot.copy()
    assert np.array_equal(_validate(overshoot), np.clip(overshoot, 0.0, 1.0))
    assert np.array_equal(overshoot, before)
    for bad in (np.array([[0.5, np.nan]], np.float32), np.array([[np.inf, 0.5]]),
                np.array([[-np.inf, 0.5]])):
        with pytest.raises(ValueError, match="NaN or infinite"):
            _validate(bad)
    image = _image(30, 40)
    preprocess(image, version="2")
    assert np.array_equal(image, _image(30, 40))  # the caller's pixels are left as they were
