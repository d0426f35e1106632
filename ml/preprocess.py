"""The one image preprocessing shared by training and serving (no TensorFlow here)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

# Bump whenever preprocess() output changes for the same input: it is recorded on every
# prediction and in each model artifact, and a model is always served with the version it
# was trained with. "1": resize only. "2": crop uniform borders, equalise, then as "1".
# Experimental versions ("3" lung-field crop, "4" local equalisation) live in
# ml.experiments.preprocessing and exist only where that module has been imported (training,
# evaluation): no served artifact uses them, so a worker never needs their code or scipy.
PREPROCESS_VERSION = "2"
SERVED_PREPROCESS_VERSIONS = ("1", "2")

# Keras ResNet50 "caffe" convention: BGR channel order, per-channel mean subtraction, no scaling.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)

# Pillow's BILINEAR on mode "F" widens its filter support by the scale factor when
# downscaling, so it is already antialiased (area-like). reducing_gap is deliberately not
# used: it is a speed shortcut that changes the output slightly.
_RESAMPLE = Image.Resampling.BILINEAR

# Decoders may overshoot [0, 1] by float round-off; anything beyond this is a caller bug
# (e.g. 0-255 pixels) and would silently produce garbage, so it is rejected.
_RANGE_TOLERANCE = 1e-3

# v2: borders and histograms are computed at about this resolution. Uploads are often
# 2,000-3,000 px; box-averaging them first keeps v2 fast and makes the statistics depend
# little on the scanner's resolution.
_WORK_SIDE = 512
# A border line (row or column) is flat (any grey level: padding) or a near-constant
# black/white frame (scanner collimation, scanned-film edges). Never more than 15% per
# side is removed, so an unusual image loses at most a margin, not anatomy.
_FLAT_STD = 0.01
_FRAME_STD = 0.04
_FRAME_DARK, _FRAME_BRIGHT = 0.06, 0.94
_MAX_CROP = 0.15
HISTOGRAM_BINS = 256


def _validate(pixels: np.ndarray) -> np.ndarray:
    """Return pixels as float32 in [0, 1] or raise ValueError (the caller's array if it already is)."""
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"image is empty (shape {arr.shape})")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"expected real-valued pixels, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    # min and max propagate NaN and reach infinity: two passes instead of a mask and two.
    lo, hi = float(arr.min()), float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("image contains NaN or infinite values")
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(f"pixel values must lie in [0, 1], got [{lo:g}, {hi:g}]")
    if lo < 0.0 or hi > 1.0:
        return np.clip(arr, 0.0, 1.0)
    return arr  # nothing below writes into it


def _check_version(version: str) -> None:
    if version not in _VERSIONS:
        raise ValueError(
            f"unknown preprocess version {version!r}; supported: {supported_versions()}"
        )


def _shrink(arr: np.ndarray) -> np.ndarray:
    """Box-average by an integer factor so the longer side lies in [_WORK_SIDE, 2*_WORK_SIDE)."""
    factor = max(arr.shape) // _WORK_SIDE
    if factor < 2:
        return arr
    return np.asarray(Image.fromarray(arr, mode="F").reduce(factor), dtype=np.float32)


def _border_lines(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    flat = std < _FLAT_STD
    frame = (std < _FRAME_STD) & ((mean < _FRAME_DARK) | (mean > _FRAME_BRIGHT))
    return flat | frame


def _leading(is_border: np.ndarray) -> int:
    """How many lines from the start are border lines, capped at _MAX_CROP of all lines."""
    cap = int(_MAX_CROP * is_border.size)
    inner = np.flatnonzero(~is_border[:cap])
    return int(inner[0]) if inner.size else cap


def crop_borders(arr: np.ndarray) -> np.ndarray:
    """Drop outer rows, then columns, that are flat or near-constant black/white frames."""
    rows = _border_lines(arr.mean(axis=1), arr.std(axis=1))
    top, bottom = _leading(rows), _leading(rows[::-1])
    arr = arr[top : arr.shape[0] - bottom]
    cols = _border_lines(arr.mean(axis=0), arr.std(axis=0))
    left, right = _leading(cols), _leading(cols[::-1])
    return arr[:, left : arr.shape[1] - right]


def border_cropped(arr: np.ndarray) -> np.ndarray:
    """Version 2's first steps on a [0, 1] image: shrink to the working size, drop borders."""
    return crop_borders(_shrink(arr))


def histogram_bins(arr: np.ndarray) -> np.ndarray:
    """The histogram bin (0..HISTOGRAM_BINS-1, uint8) of each pixel of a [0, 1] image."""
    # In float32, 1.0 * 255 + 0.5 is 255.5, which truncates to 255: no bin past the last.
    return (arr * np.float32(HISTOGRAM_BINS - 1) + np.float32(0.5)).astype(np.uint8)


def equalize(arr: np.ndarray) -> np.ndarray:
    """Global histogram equalisation over 256 bins; a constant image is returned unchanged."""
    bins = histogram_bins(arr)
    counts = np.bincount(bins.ravel(), minlength=HISTOGRAM_BINS)
    cdf = np.cumsum(counts)
    lowest = cdf[np.flatnonzero(counts)[0]]  # the darkest occupied bin's
    if cdf[-1] == lowest:
        return arr
    lut = ((cdf - lowest) / (cdf[-1] - lowest)).clip(0.0, 1.0).astype(np.float32)
    return lut.take(bins)


# Each version: the validated [0, 1] image -> the [0, 1] image that is then resized.
_VERSIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "1": lambda arr: arr,
    "2": lambda arr: equalize(border_cropped(arr)),
}


def register_version(version: str, steps: Callable[[np.ndarray], np.ndarray]) -> None:
    """Add an experimental version (its steps before the resize); served ones cannot change."""
    if version in SERVED_PREPROCESS_VERSIONS:
        raise ValueError(f"preprocess version {version!r} is served and cannot be replaced")
    _VERSIONS[version] = steps


def supported_versions() -> tuple[str, ...]:
    """The versions this process can compute: the served ones plus any registered."""
    return tuple(sorted(_VERSIONS))


def preprocess_gray(
    pixels: np.ndarray, size: int = 224, *, version: str = PREPROCESS_VERSION
) -> np.ndarray:
    """The single grey channel of preprocess(): (size, size) float32 in [0, 255]."""
    _check_version(version)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    arr = _VERSIONS[version](_validate(pixels))
    # Stretched to a square (no padding): training and serving do the same, which is what counts.
    resized = Image.fromarray(arr, mode="F").resize((size, size), _RESAMPLE)
    return np.asarray(resized, dtype=np.float32) * np.float32(255.0)


def to_caffe(gray: np.ndarray) -> np.ndarray:
    """Grey values in [0, 255], shape (..., h, w) -> (..., h, w, 3) BGR minus the ImageNet mean."""
    gray = np.asarray(gray, dtype=np.float32)
    out = np.empty(gray.shape + (3,), np.float32)
    for channel, mean in enumerate(IMAGENET_BGR_MEAN):  # a plane at a time: 4x np.stack's speed
        np.subtract(gray, np.float32(mean), out=out[..., channel])
    return out


def preprocess(
    pixels: np.ndarray, size: int = 224, *, version: str = PREPROCESS_VERSION
) -> np.ndarray:
    """Turn a 2-D [0, 1] X-ray into a (size, size, 3) float32 ResNet50 'caffe' input."""
    return to_caffe(preprocess_gray(pixels, size, version=version))


def preprocess_batch(
    images: Sequence[np.ndarray], size: int = 224, *, version: str = PREPROCESS_VERSION
) -> np.ndarray:
    """Preprocess several images into one (N, size, size, 3) float32 batch."""
    if len(images) == 0:
        raise ValueError("no images to preprocess")
    batch = np.empty((len(images), size, size, 3), np.float32)
    for i, image in enumerate(images):
        batch[i] = preprocess(image, size, version=version)
    return batch
