"""Tests for ml.experiments.preprocessing: versions 3 (lung-field crop) and 4 (CLAHE)."""

import numpy as np
import pytest

from ml.experiments.preprocessing import clahe, lung_box
from ml.imaging import decode_image
from ml.preprocess import equalize, preprocess, preprocess_gray, supported_versions
from tests.conftest import fixture_bytes


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width), dtype=np.float32)


def _xray() -> np.ndarray:
    return decode_image(fixture_bytes("hannover__0957ce54.png")).pixels


def test_importing_the_module_registers_versions_3_and_4() -> None:
    assert supported_versions() == ("1", "2", "3", "4")


# --- version 3: the lung-field crop ---------------------------------------------------------


def _chest(opaque_right: bool = False) -> np.ndarray:
    """A phantom: dark air around a bright body holding two dark lungs (the right one, on
    the image's left, filled in like a consolidated lung if opaque_right)."""
    i, j = np.indices((300, 240)) / np.array([300.0, 240.0])[:, None, None]
    image = np.full((300, 240), 0.05, np.float32)
    body = ((j - 0.5) / 0.45) ** 2 + ((i - 0.55) / 0.6) ** 2 < 1.0
    image[body] = 0.8
    for cx, opaque in ((0.3, opaque_right), (0.7, False)):
        lung = ((j - cx) / 0.14) ** 2 + ((i - 0.45) / 0.25) ** 2 < 1.0
        image[lung] = 0.75 if opaque else 0.25
    noise = np.random.default_rng(0).normal(0.0, 0.02, image.shape)
    return np.clip(image + noise, 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("opaque_right", [False, True])
def test_lung_box_frames_both_lungs(opaque_right: bool) -> None:
    # Lungs span rows 60-210 and columns 38-206; the box adds 5% (10% below), and an opaque
    # lung is covered by mirroring the one found about the midline.
    box = lung_box(_chest(opaque_right))
    assert box is not None
    rows, cols = box
    assert 30 <= rows.start <= 60 and 210 <= rows.stop <= 250
    assert 20 <= cols.start <= 40 and 200 <= cols.stop <= 220
    assert abs(cols.start - (240 - cols.stop)) <= 3  # symmetric about the midline


def test_lung_box_declines_images_without_lungs() -> None:
    assert lung_box(np.full((100, 100), 0.5, np.float32)) is None
    assert lung_box(_image(100, 100)) is None  # noise: no large dark region
    # All dark (air everywhere) touches the frame: not lungs.
    assert lung_box(np.zeros((100, 100), np.float32)) is None


def test_version_3_crops_to_the_lungs_and_falls_back_to_version_2() -> None:
    chest = _chest()
    v2, v3 = (preprocess_gray(chest, 64, version=v) for v in ("2", "3"))
    # The air around the body is mostly gone: far fewer of the darkest pixels at the corners.
    corners = np.r_[v2[:8, :8].ravel(), v2[-8:, -8:].ravel()]
    assert corners.mean() < 60.0 and v3[:8, :8].mean() > corners.mean()
    assert not np.allclose(v2, v3)
    flat = np.full((100, 100), 0.5, np.float32)
    np.testing.assert_array_equal(
        preprocess_gray(flat, 32, version="3"), preprocess_gray(flat, 32, version="2")
    )
    for image in (np.zeros((40, 40)), np.full((5, 3), 0.5), np.ones((1, 1))):
        out = preprocess(image.astype(np.float32), 32, version="3")
        assert out.shape == (32, 32, 3) and np.isfinite(out).all()


def test_version_3_finds_the_lungs_of_a_real_xray() -> None:
    image = _xray()
    eq = preprocess_gray(image, 64, version="2")
    v3 = preprocess_gray(image, 64, version="3")
    assert v3.shape == (64, 64) and np.abs(v3 - eq).mean() > 5.0


# --- version 4: local (CLAHE) equalisation -------------------------------------------------


def _two_exposures() -> np.ndarray:
    """Left half dim, right half bright, the same texture in both."""
    texture = _image(128, 64, seed=3) * 0.2
    return np.concatenate([0.1 + texture, 0.6 + texture], axis=1).astype(np.float32)


def test_clahe_gives_each_region_its_own_contrast() -> None:
    image = _two_exposures()
    local, whole = clahe(image), equalize(image)
    assert local.shape == image.shape and local.dtype == np.float32
    assert local.min() >= 0.0 and local.max() <= 1.0
    # Global equalisation keeps the halves apart (dark vs bright); unclipped CLAHE brings
    # their interiors (away from the seam, where tiles blend) to about the same grey, and
    # the default contrast limit goes part of the way.
    gap = lambda x: abs(x[:, 16:40].mean() - x[:, -24:].mean())  # noqa: E731
    assert gap(whole) > 0.4
    assert gap(clahe(image, clip=1e9)) < 0.05
    assert gap(local) < gap(whole) - 0.1
    # Within a half the order of grey levels survives: CLAHE maps are monotone per tile.
    half = image[:, -24:].ravel()
    assert np.corrcoef(half, local[:, -24:].ravel())[0, 1] > 0.95


def test_clahe_with_one_tile_and_no_clip_is_global_equalisation() -> None:
    image = _image(50, 70, seed=5)
    np.testing.assert_allclose(clahe(image, tiles=1, clip=1e9), equalize(image), atol=1 / 255)


def test_clahe_limits_contrast_in_flat_regions() -> None:
    # A nearly flat image: unclipped equalisation stretches the noise to the full range,
    # the contrast limit keeps it to a fraction of it.
    flat = (0.5 + 0.01 * _image(64, 64, seed=7)).astype(np.float32)
    assert np.ptp(equalize(flat)) > 0.9
    assert np.ptp(clahe(flat)) < 0.5


def test_version_4_differs_from_2_and_handles_odd_images() -> None:
    image = _two_exposures()
    v2, v4 = (preprocess_gray(image, 64, version=v) for v in ("2", "4"))
    assert np.abs(v2 - v4).mean() > 5.0
    for odd in (np.zeros((40, 40)), np.full((5, 3), 0.5), np.ones((1, 1)), np.ones((3, 900))):
        out = preprocess(odd.astype(np.float32), 32, version="4")
        assert out.shape == (32, 32, 3) and np.isfinite(out).all()
