"""The one image preprocessing shared by training and serving (no TensorFlow here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

# Bump whenever preprocess() output changes for the same input: it is recorded on every
# prediction and checked against each model artifact, so a model is never served with
# a preprocessing it was not trained with.
PREPROCESS_VERSION = "1"

# Keras ResNet50 "caffe" convention: BGR channel order, per-channel mean subtraction, no scaling.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)

# Pillow's BILINEAR on mode "F" widens its filter support by the scale factor when
# downscaling, so it is already antialiased (area-like). reducing_gap is deliberately not
# used: it is a speed shortcut that changes the output slightly.
_RESAMPLE = Image.Resampling.BILINEAR

# Decoders may overshoot [0, 1] by float round-off; anything beyond this is a caller bug
# (e.g. 0-255 pixels) and would silently produce garbage, so it is rejected.
_RANGE_TOLERANCE = 1e-3


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


def preprocess(pixels: np.ndarray, size: int = 224) -> np.ndarray:
    """Turn a 2-D [0, 1] X-ray into a (size, size, 3) float32 ResNet50 'caffe' input."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    arr = _validate(pixels)
    # Stretched to a square (no padding): training and serving do the same, which is what counts.
    resized = Image.fromarray(arr, mode="F").resize((size, size), _RESAMPLE)
    gray = np.asarray(resized, dtype=np.float32) * np.float32(255.0)
    return np.stack([gray] * 3, axis=-1) - np.asarray(IMAGENET_BGR_MEAN, dtype=np.float32)


def preprocess_batch(images: Sequence[np.ndarray], size: int = 224) -> np.ndarray:
    """Preprocess several images into one (N, size, size, 3) float32 batch."""
    if len(images) == 0:
        raise ValueError("no images to preprocess")
    return np.stack([preprocess(image, size) for image in images]).astype(np.float32, copy=False)
