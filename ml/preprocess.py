"""The one image preprocessing shared by training and serving (no TensorFlow here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

# Bump whenever preprocess() output changes for the same input: it is recorded on every
# prediction and in each model artifact, and a model is always served with the version it
# was trained with. "1": resize only. "2": crop uniform borders, equalise, then as "1".
# "3" (experimental, not served by default): "2", then crop to the lung fields, re-equalised.
# "4" (experimental, not served by default): "2" with local (CLAHE) instead of global equalisation.
PREPROCESS_VERSION = "2"
SUPPORTED_PREPROCESS_VERSIONS = ("1", "2", "3", "4")

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
_BINS = 256
# v3: the lung fields are the largest dark regions of the equalised image away from its
# frame (air outside the body touches the frame), found at about _LUNG_SIDE px after
# smoothing. Diseased lungs are opaque, not dark, so one lung may be missed: the box is
# mirrored about the vertical midline, padded, and used only if it is large enough to hold
# a chest; otherwise the whole image is kept.
_LUNG_SIDE = 128
_LUNG_DARK = 0.35
_LUNG_MIN_AREA, _LUNG_MAX_AREA = 0.02, 0.45
_LUNG_MAX_ON_FRAME = 0.2
_LUNG_PAD, _LUNG_PAD_BOTTOM = 0.05, 0.10
_LUNG_MIN_BOX, _LUNG_MIN_WIDTH = 0.25, 0.45
# v4: contrast-limited adaptive histogram equalisation (Zuiderveld 1994) on an 8 x 8 grid of
# tiles; no bin may hold more than 2x a tile's mean bin count (OpenCV's default clipLimit).
# Sources differ in global exposure and processing curves; local equalisation leaves each
# region's structure and discards most of how the whole film was developed.
_CLAHE_TILES = 8
_CLAHE_CLIP = 2.0


def _validate(pixels: np.ndarray) -> np.ndarray:
    """Return pixels as float32 in [0, 1] or raise ValueError."""
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
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(f"pixel values must lie in [0, 1], got [{lo:g}, {hi:g}]")
    return np.clip(arr, 0.0, 1.0)


def _check_version(version: str) -> None:
    if version not in SUPPORTED_PREPROCESS_VERSIONS:
        raise ValueError(
            f"unknown preprocess version {version!r}; supported: {SUPPORTED_PREPROCESS_VERSIONS}"
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


def _bins(arr: np.ndarray) -> np.ndarray:
    """The histogram bin (0.._BINS-1) of each pixel of a [0, 1] image."""
    return np.minimum((arr * (_BINS - 1) + 0.5).astype(np.intp), _BINS - 1)


def equalize(arr: np.ndarray) -> np.ndarray:
    """Global histogram equalisation over 256 bins; a constant image is returned unchanged."""
    bins = _bins(arr)
    cdf = np.cumsum(np.bincount(bins.ravel(), minlength=_BINS))
    lowest = cdf[bins.min()]
    if cdf[-1] == lowest:
        return arr
    lut = ((cdf - lowest) / (cdf[-1] - lowest)).clip(0.0, 1.0).astype(np.float32)
    return lut[bins]


def _tile_centres(n: int, tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel along one axis: the lower and upper tile index and the weight of the upper."""
    edges = np.linspace(0, n, tiles + 1)
    centres = (edges[:-1] + edges[1:]) / 2 - 0.5
    pos = np.arange(n, dtype=np.float64)
    lower = np.clip(np.searchsorted(centres, pos, side="right") - 1, 0, tiles - 1)
    upper = np.minimum(lower + 1, tiles - 1)
    span = np.where(upper > lower, centres[upper] - centres[lower], 1.0)
    weight = np.clip((pos - centres[lower]) / span, 0.0, 1.0) * (upper > lower)
    return lower, upper, weight.astype(np.float32)


def clahe(arr: np.ndarray, tiles: int = _CLAHE_TILES, clip: float = _CLAHE_CLIP) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0, 1] image, bilinearly blended."""
    h, w = arr.shape
    tiles = max(1, min(tiles, h // 2, w // 2))
    bins = _bins(arr)
    rows, cols = np.linspace(0, h, tiles + 1).astype(int), np.linspace(0, w, tiles + 1).astype(int)
    luts = np.empty((tiles, tiles, _BINS), dtype=np.float32)
    for i in range(tiles):
        for j in range(tiles):
            tile = bins[rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
            hist = np.bincount(tile.ravel(), minlength=_BINS).astype(np.float64)
            limit = max(1.0, clip * tile.size / _BINS)
            excess = np.maximum(hist - limit, 0.0).sum()
            hist = np.minimum(hist, limit) + excess / _BINS
            luts[i, j] = np.cumsum(hist) / tile.size
    y0, y1, wy = _tile_centres(h, tiles)
    x0, x1, wx = _tile_centres(w, tiles)
    wy, wx = wy[:, None], wx[None, :]
    y0, y1, x0, x1 = y0[:, None], y1[:, None], x0[None, :], x1[None, :]
    top = luts[y0, x0, bins] * (1 - wx) + luts[y0, x1, bins] * wx
    bottom = luts[y1, x0, bins] * (1 - wx) + luts[y1, x1, bins] * wx
    return np.clip(top * (1 - wy) + bottom * wy, 0.0, 1.0).astype(np.float32)


def lung_box(eq: np.ndarray) -> tuple[slice, slice] | None:
    """(rows, cols) of the lung fields' box in an equalised image, or None if none is found."""
    from scipy import ndimage  # only preprocessing version 3 needs it

    h, w = eq.shape
    scale = max(h, w) / _LUNG_SIDE
    small_w, small_h = max(8, round(w / scale)), max(8, round(h / scale))
    small = np.asarray(Image.fromarray(eq, mode="F").resize((small_w, small_h), _RESAMPLE))
    dark = ndimage.binary_opening(ndimage.gaussian_filter(small, 1.5) < _LUNG_DARK, iterations=3)
    labels, n = ndimage.label(dark)
    frame = np.ones_like(dark)
    frame[2:-2, 2:-2] = False
    found = []
    for i in range(1, n + 1):
        region = labels == i
        area = region.mean()
        ys, xs = np.nonzero(region)
        cy, cx = ys.mean() / small_h, xs.mean() / small_w
        on_frame = (region & frame).sum() / region.sum()
        if (
            _LUNG_MIN_AREA <= area <= _LUNG_MAX_AREA
            and 0.1 < cx < 0.9
            and 0.15 < cy < 0.85
            and on_frame < _LUNG_MAX_ON_FRAME
        ):
            found.append((area, i))
    if not found:
        return None
    ys, xs = np.nonzero(np.isin(labels, [i for _, i in sorted(found, reverse=True)[:2]]))
    top, bottom = ys.min() / small_h, (ys.max() + 1) / small_h
    left, right = xs.min() / small_w, (xs.max() + 1) / small_w
    left, right = min(left, 1 - right), max(right, 1 - left)  # mirrored about the midline
    top, left = max(0.0, top - _LUNG_PAD), max(0.0, left - _LUNG_PAD)
    bottom, right = min(1.0, bottom + _LUNG_PAD_BOTTOM), min(1.0, right + _LUNG_PAD)
    if (bottom - top) * (right - left) < _LUNG_MIN_BOX or right - left < _LUNG_MIN_WIDTH:
        return None
    return (
        slice(int(top * h), max(int(top * h) + 1, round(bottom * h))),
        slice(int(left * w), max(int(left * w) + 1, round(right * w))),
    )


def preprocess_gray(
    pixels: np.ndarray, size: int = 224, *, version: str = PREPROCESS_VERSION
) -> np.ndarray:
    """The single grey channel of preprocess(): (size, size) float32 in [0, 255]."""
    _check_version(version)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    arr = _validate(pixels)
    if version != "1":
        cropped = crop_borders(_shrink(arr))
        arr = clahe(cropped) if version == "4" else equalize(cropped)
        box = lung_box(arr) if version == "3" else None
        if box is not None:
            arr = equalize(cropped[box])
    # Stretched to a square (no padding): training and serving do the same, which is what counts.
    resized = Image.fromarray(arr, mode="F").resize((size, size), _RESAMPLE)
    return np.asarray(resized, dtype=np.float32) * np.float32(255.0)


def to_caffe(gray: np.ndarray) -> np.ndarray:
    """Grey values in [0, 255], shape (..., h, w) -> (..., h, w, 3) BGR minus the ImageNet mean."""
    gray = np.asarray(gray, dtype=np.float32)
    return np.stack([gray] * 3, axis=-1) - np.asarray(IMAGENET_BGR_MEAN, dtype=np.float32)


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
    return np.stack([preprocess(image, size, version=version) for image in images]).astype(
        np.float32, copy=False
    )
