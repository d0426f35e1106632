"""ml.experiments.gate_cv: folds keep a patient's images together and scores are out of fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml.experiments.gate_cv import cv_folds, cv_groups, out_of_fold, source_balanced, unreadable
from ml.training.gate import CLASSES
from ml.training.gate_data import Sample


def _sample(key: str, kind: str, source: str) -> Sample:
    return Sample(key, kind, "train", source, kind, lambda: (np.zeros((4, 4)), {}))


def test_groups_keep_a_patient_and_everything_made_from_its_films_together(tmp_path: Path) -> None:
    cxr, ood = tmp_path / "cxr", tmp_path / "ood"
    cxr.mkdir(), ood.mkdir()
    (cxr / "manifest.csv").write_text("file,patient_id\na.png,p1\nb.png,p1\nc.png,\n")
    (ood / "manifest.csv").write_text("file,patient_id\nlat.png,p9\n")
    samples = [_sample("a.png", "frontal", "nih"), _sample("b.png", "frontal", "nih"),
               _sample("inverted:a.png", "inverted", "nih"), _sample("poor_exposure:b.png", "poor_exposure", "nih"),
               _sample("c.png", "frontal", "cxnet"), _sample("lat.png", "lateral_xray", "ood"),
               _sample("photo:coffee:0", "photo", "coffee"), _sample("photo:coffee:1", "photo", "coffee"),
               _sample("noise:3", "noise", "synthetic")]
    groups = cv_groups(samples, cxr, ood)
    assert list(groups) == ["p1", "p1", "p1", "p1", "c.png", "p9", "base:coffee", "base:coffee", "noise:3"]
    folds = cv_folds(np.array([f"g{i}" for i in range(400)] * 2), 5)
    assert set(folds) == {0, 1, 2, 3, 4} and np.array_equal(folds[:400], folds[400:])


def test_out_of_fold_scores_come_from_fits_without_the_scored_fold() -> None:
    # Frontal features near 0, every other class near 6 on an axis of its own. One frontal
    # group sits where "other" does: scored out of fold, nothing like it remains in the fit, so
    # it looks like "other".
    rng = np.random.default_rng(0)
    n = 120
    kinds = [CLASSES[1 + i % (len(CLASSES) - 1)] for i in range(n)]
    away = np.zeros((n, 8))
    away[np.arange(n), [CLASSES.index(k) for k in kinds]] = 6.0
    features = np.concatenate([rng.normal(0, 1, (n, 8)), rng.normal(0, 1, (n, 8)) + away])
    features[:10, CLASSES.index("other")] += 6.0
    data = {"features": features, "stats": np.zeros((2 * n, 14))}
    classes = np.array(["frontal"] * n + kinds)
    fold = np.concatenate([np.zeros(10, int), 1 + np.arange(n - 10) % 4, np.arange(n) // 5 % 5])
    everything = np.ones(2 * n, bool)
    p_frontal, distance = out_of_fold(data, classes, everything, classes == "frontal", fold,
                                      components=4, c=1.0)
    assert p_frontal[:10].max() < 0.5 and np.median(p_frontal[10:n]) > 0.5
    assert distance[:10].min() > np.quantile(distance[10:n], 0.95)
    assert np.all(p_frontal[n:] == 0)  # not scored


def test_source_weights_give_every_frontal_source_the_same_total() -> None:
    classes = np.array(["frontal"] * 6 + ["other"] * 2)
    sources = np.array(["a"] * 4 + ["b"] * 2 + ["x"] * 2)
    w = source_balanced(classes, sources)
    assert w[:4].sum() == w[4:6].sum() and w[:6].mean() == 1.0 and list(w[6:]) == [1.0, 1.0]


def test_unreadable_exposures_leave_little_of_the_film() -> None:
    x = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    for seed in range(6):
        y = unreadable(x, np.random.default_rng(seed))
        assert y.min() >= 0 and y.max() <= 1
        clipped = np.mean((y <= 0.0) | (y >= 1.0))
        contrast = abs(np.corrcoef(x.ravel(), y.ravel())[0, 1])
        assert clipped > 0.8 or contrast < 0.7 or y.std() < 0.05


def test_figure_like_variants_stay_films_grouped_with_their_base() -> None:
    from ml.experiments.gate_cv import _figure_like, frontal_variants
    from ml.training.gate_data import Sample

    film = np.tile(np.linspace(0.1, 0.9, 300, dtype=np.float32), (360, 1))
    for seed in range(20):
        out = _figure_like(film, np.random.default_rng(seed))
        assert out.ndim == 2 and out.min() >= 0.0 and out.max() <= 1.0
        assert 0.6 * 360 <= out.shape[0] <= 1.4 * 360  # cropped in or framed, not resized away
    base = Sample("images/x.png", "frontal", "train", "src", "covid", lambda: (film, {}))
    [variant] = frontal_variants([base], 1)
    assert (variant.kind, variant.split, variant.source) == ("frontal_variant", "train", "src")
    assert variant.key.split(":", 1)[1] == base.key  # cv_groups puts it with its base's patient
    pixels, _ = variant.load()
    assert pixels.ndim == 2 and max(pixels.shape) <= 900
