"""Tests for ml.overlay: the heatmap drawn over the X-ray as a PNG."""

import io

import numpy as np
import pytest
from PIL import Image

from ml.overlay import decode_cam, encode_cam, overlay_png


def _decode(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(png))


def test_overlay_keeps_small_images_at_their_size() -> None:
    pixels = np.random.default_rng(0).random((300, 200), dtype=np.float32)
    image = _decode(overlay_png(pixels, np.eye(3, dtype=np.float32)))
    assert image.mode == "RGB" and image.size == (200, 300)


def test_overlay_shrinks_large_images_to_max_side() -> None:
    pixels = np.zeros((1024, 800), dtype=np.float32)
    assert _decode(overlay_png(pixels, np.ones((7, 7), np.float32))).size == (400, 512)
    assert _decode(overlay_png(pixels, np.ones((7, 7), np.float32), max_side=256)).size == (
        200,
        256,
    )


def test_overlay_blends_heatmap_colours() -> None:
    pixels = np.full((64, 64), 0.5, dtype=np.float32)
    plain = np.asarray(_decode(overlay_png(pixels, np.zeros((2, 2), np.float32), alpha=0.0)))
    np.testing.assert_array_equal(plain, np.full((64, 64, 3), 128, np.uint8))
    hot = np.asarray(_decode(overlay_png(pixels, np.ones((2, 2), np.float32), alpha=0.4)))
    cold = np.asarray(_decode(overlay_png(pixels, np.zeros((2, 2), np.float32), alpha=0.4)))
    # "jet": high values are red, low values are blue.
    assert hot[..., 0].mean() > hot[..., 2].mean() and cold[..., 2].mean() > cold[..., 0].mean()


def test_overlay_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        overlay_png(np.zeros((8, 8, 3), np.float32), np.zeros((2, 2), np.float32))


def test_overlay_compression_level_changes_bytes_not_pixels() -> None:
    from ml.overlay import PNG_COMPRESS_LEVEL

    pixels = np.tile(np.linspace(0.0, 1.0, 300, dtype=np.float32), (200, 1))
    heat = np.outer(np.hanning(7), np.hanning(7)).astype(np.float32)
    fast, small = overlay_png(pixels, heat), overlay_png(pixels, heat, compress_level=9)
    assert PNG_COMPRESS_LEVEL == 1 and fast != small
    np.testing.assert_array_equal(np.asarray(_decode(fast)), np.asarray(_decode(small)))


def test_cam_bytes_round_trip_and_refuse_anything_else() -> None:
    cam = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    data = encode_cam(cam)
    assert len(data) < 512 and np.array_equal(decode_cam(data), cam)
    with pytest.raises(ValueError):
        encode_cam(np.zeros((2, 3, 4), np.float32))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for bad in (b"", b"not a map", pickled.getvalue(), encode_cam(cam)[:-8]):
        with pytest.raises(ValueError):
            decode_cam(bad)
