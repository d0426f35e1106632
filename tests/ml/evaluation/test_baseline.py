"""The thumbnail shortcut baseline on synthetic images whose answer is known."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.evaluation.baseline import (
    ThumbnailBaseline,
    ThumbnailCache,
    source_predictability,
    thumbnail_features,
)
from ml.evaluation.metrics import auroc
from ml.training.data import Record


def _write(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def _noise(rng: np.random.Generator, shape: tuple[int, int] = (80, 64)) -> np.ndarray:
    return rng.normal(0.0, 0.12, shape)


def _bright_or_dark(tmp_path: Path, n: int, seed: int) -> list[Record]:
    """Class = overall brightness (COVID images brighter), plus pixel noise."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        target = i % 2
        level = rng.uniform(0.5, 0.7) if target else rng.uniform(0.3, 0.5)
        path = _write(tmp_path / f"img{seed}_{i}.png", level + _noise(rng))
        label = "covid" if target else "normal"
        records.append(Record(path, label, target, "synthetic", f"p{seed}_{i}", "PA"))
    return records


def test_thumbnail_features_keep_brightness_and_flatten():
    dark, bright = np.full((100, 70), 0.2), np.full((100, 70), 0.8)
    f_dark, f_bright = thumbnail_features(dark), thumbnail_features(bright)
    assert f_dark.shape == (32 * 32,) and f_dark.dtype == np.float32
    assert f_dark == pytest.approx(0.2, abs=1e-6) and f_bright == pytest.approx(0.8, abs=1e-6)
    assert thumbnail_features(dark, size=8).shape == (64,)
    with pytest.raises(ValueError):
        thumbnail_features(np.zeros((4, 4, 3)))


def test_baseline_finds_a_brightness_shortcut(tmp_path):
    train, test = _bright_or_dark(tmp_path, 60, seed=0), _bright_or_dark(tmp_path, 40, seed=1)
    baseline = ThumbnailBaseline().fit(train)
    scores = baseline.predict_proba(test)
    assert scores.shape == (40,) and ((scores >= 0) & (scores <= 1)).all()
    assert auroc([r.target for r in test], scores) > 0.95


def test_baseline_needs_both_classes_and_a_fit(tmp_path):
    records = _bright_or_dark(tmp_path, 4, seed=2)
    with pytest.raises(ValueError):
        ThumbnailBaseline().fit([r for r in records if r.target == 1])
    with pytest.raises(RuntimeError):
        ThumbnailBaseline().predict_proba(records)


def _sourced(tmp_path: Path, n: int, seed: int) -> list[Record]:
    """Three collections told apart by a border, a corner marker, or nothing; labels random."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        source = ("bordered", "marked", "plain")[i % 3]
        pixels = 0.5 + _noise(rng)
        if source == "bordered":
            pixels[:6], pixels[-6:] = 0.0, 0.0
        elif source == "marked":
            pixels[4:16, 4:24] = 1.0
        target = int(rng.integers(0, 2))
        path = _write(tmp_path / f"src{seed}_{i}.png", pixels)
        records.append(Record(path, "covid" if target else "normal", target, source, None, "AP"))
    return records


def test_source_is_predictable_from_thumbnails(tmp_path):
    cache = ThumbnailCache()
    result = source_predictability(
        _sourced(tmp_path, 45, seed=3), _sourced(tmp_path, 30, seed=4), cache
    )
    assert result["chance"] == pytest.approx(1 / 3)
    assert result["accuracy"] > 0.9 > result["chance"]
    assert set(result["per_source"]) == {"bordered", "marked", "plain"}
    assert result["n_test"] == 30 and result["sources_train"] == ["bordered", "marked", "plain"]


def test_cache_decodes_each_file_once(tmp_path, monkeypatch):
    records = _bright_or_dark(tmp_path, 4, seed=5)
    cache = ThumbnailCache()
    first = cache.matrix(records)
    monkeypatch.setattr("ml.evaluation.baseline.decode_image", lambda data: pytest.fail("decoded twice"))
    assert np.array_equal(cache.matrix(records), first)
