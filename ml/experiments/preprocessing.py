"""Experimental preprocessing versions 3 (lung-field crop) and 4 (local equalisation).

Importing this module registers them with ml.preprocess, so training (--preprocess-version),
ml.training.pack and evaluation can use them. No served artifact does: the serving code and
the slim CPU worker carry neither this module nor scipy. Both were measured across sources
and lost to version 2 (docs/experiments/README.md).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ml import preprocess
from ml.preprocess import HISTOGRAM_BINS, border_cropped, equalize, histogram_bins

RESAMPLE = Image.Resampling.BILINEAR  # as ml.preprocess resizes

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
    bins = histogram_bins(arr)
    rows, cols = np.linspace(0, h, tiles + 1).astype(int), np.linspace(0, w, tiles + 1).astype(int)
    luts = np.empty((tiles, tiles, HISTOGRAM_BINS), dtype=np.float32)
    for i in range(tiles):
        for j in range(tiles):
            tile = bins[rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
            hist = np.bincount(tile.ravel(), minlength=HISTOGRAM_BINS).astype(np.float64)
            limit = max(1.0, clip * tile.size / HISTOGRAM_BINS)
            excess = np.maximum(hist - limit, 0.0).sum()
            hist = np.minimum(hist, limit) + excess / HISTOGRAM_BINS
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
    small = np.asarray(Image.fromarray(eq, mode="F").resize((small_w, small_h), RESAMPLE))
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


def lung_crop(arr: np.ndarray) -> np.ndarray:
    """Version 3: version 2, then cropped to the lung fields and equalised again (if found)."""
    cropped = border_cropped(arr)
    eq = equalize(cropped)
    box = lung_box(eq)
    return eq if box is None else equalize(cropped[box])


def local_equalisation(arr: np.ndarray) -> np.ndarray:
    """Version 4: version 2 with CLAHE in place of the global equalisation."""
    return clahe(border_cropped(arr))


preprocess.register_version("3", lung_crop)
preprocess.register_version("4", local_equalisation)
