"""Heatmap overlays as PNG (numpy, Pillow, matplotlib colormaps; no TensorFlow)."""

from __future__ import annotations

import io

import matplotlib  # colormaps only: no pyplot, so no GUI backend is ever loaded
import numpy as np
from PIL import Image

_EPS = 1e-12


def normalise_maps(cam: np.ndarray) -> np.ndarray:
    """ReLU'd class-activation maps (N, h, w) scaled so each peaks at 1.0; flat maps become zeros."""
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    cam = np.maximum(cam, 0.0)
    peak = cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
    # Divide (not multiply by 1/peak) so each map peaks at exactly 1.0.
    normalised = np.where(peak > _EPS, cam / np.where(peak > _EPS, peak, 1.0), 0.0)
    return np.clip(normalised, 0.0, 1.0).astype(np.float32)


def encode_cam(cam: np.ndarray) -> bytes:
    """A normalised 2-D CAM as bytes to store (.npy, float32): a few hundred bytes per image."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"expected a non-empty 2-D map, got shape {cam.shape}")
    buf = io.BytesIO()
    np.save(buf, cam, allow_pickle=False)
    return buf.getvalue()


def decode_cam(data: bytes) -> np.ndarray:
    """The map encode_cam stored; raises ValueError on anything else."""
    try:
        cam = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, EOFError) as exc:  # numpy's own errors for a bad header or a short file
        raise ValueError(f"not a stored CAM: {exc}") from exc
    if not isinstance(cam, np.ndarray) or cam.ndim != 2 or cam.dtype != np.float32:
        raise ValueError("not a stored CAM: expected a 2-D float32 array")
    return cam


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float array to (width, height) with Pillow bilinear."""
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


# zlib level 1: on real X-ray overlays about 3x faster to encode than Pillow's default 6,
# for files about 16% larger (bench/overlay.py). Encoding was the largest part of an overlay.
PNG_COMPRESS_LEVEL = 1


def overlay_png(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    max_side: int = 512,
    alpha: float = 0.4,
    compress_level: int = PNG_COMPRESS_LEVEL,
) -> bytes:
    """Blend a "jet" heatmap over a 2-D [0, 1] X-ray and return RGB PNG bytes, longest side <= max_side."""
    if pixels.ndim != 2 or heatmap.ndim != 2 or pixels.size == 0 or heatmap.size == 0:
        raise ValueError(f"expected non-empty 2-D arrays, got {pixels.shape} and {heatmap.shape}")
    if max_side < 1 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need max_side >= 1 and alpha in [0, 1], got {max_side}, {alpha}")
    height, width = pixels.shape
    ratio = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))

    gray = np.clip(np.nan_to_num(_resize(pixels, size)), 0.0, 1.0)
    heat = np.clip(np.nan_to_num(_resize(heatmap, size)), 0.0, 1.0)
    colours = matplotlib.colormaps["jet"](heat)[..., :3]
    blended = (1.0 - alpha) * gray[..., None] + alpha * colours
    rgb = np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
