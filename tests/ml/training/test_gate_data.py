"""Which radiographs the input gate is fitted on (ml.training.gate_data), on the shipped split."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from ml.gate import STAT_NAMES
from ml.training.gate import TRAIN_ONLY_SOURCES, gate_split, gate_splits
from ml.training.gate_data import all_samples

REPO = Path(__file__).resolve().parents[3]
CXR, OOD = REPO.parent / "shared" / "data" / "cxr", REPO.parent / "shared" / "data" / "ood"


def _fit_radiographs(**kwargs) -> collections.Counter:
    samples = all_samples(REPO / "models" / "current", CXR, OOD, keep_sources=TRAIN_ONLY_SOURCES,
                          **kwargs)
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys))  # nothing twice
    return collections.Counter(s.source for s in samples if s.kind == "frontal" and s.split == "train")


def test_min_per_source_tops_up_small_sources_only() -> None:
    uniform, topped = _fit_radiographs(), _fit_radiographs(min_per_source=160)
    for source, n in uniform.items():
        if source in TRAIN_ONLY_SOURCES or n >= 160:
            assert topped[source] == n, source  # untouched
        else:
            assert n < topped[source] == 160, source  # topped up, by hash: the same every time
    assert _fit_radiographs(min_per_source=160) == topped


def test_per_source_thresholds_meet_the_target_in_every_source_not_only_pooled() -> None:
    from ml.training.gate import CLASSES, choose_thresholds, fit_arrays, make_gate

    rng = np.random.default_rng(0)
    big = rng.normal(0.0, 1.0, (400, 8))  # one large source, centred
    small = rng.normal(2.5, 1.0, (20, 8))  # a small one, off-centre: pooled, its images stand out
    others = [rng.normal(6.0 + i, 1.0, (30, 8)) for i, _ in enumerate(CLASSES[1:])]
    fit = np.concatenate([big, rng.normal(0.0, 1.0, (60, 8)), *others])
    classes = ["frontal"] * 460 + [name for name in CLASSES[1:] for _ in range(30)]
    stats = np.zeros((len(fit), len(STAT_NAMES)))
    gate = make_gate(fit_arrays(fit, stats, classes, components=4, c=1.0))
    features = np.concatenate([big, small])
    sources = np.array(["big"] * 400 + ["small"] * 20)
    val_stats = np.zeros((len(features), len(STAT_NAMES)))
    _, distances = gate.scores(features, val_stats)
    pooled = choose_thresholds(gate, features, val_stats, target=0.01)
    each = choose_thresholds(gate, features, val_stats, target=0.01, sources=sources)
    assert (distances[400:] > pooled[1]).sum() >= 3  # pooled: the small source pays
    assert (distances[400:] > each[1]).sum() <= 1  # per source: at most 1% of it, rounded up
    assert each[1] >= pooled[1] and each[0] <= pooled[0]


def test_train_only_sources_give_validation_images_only_to_the_per_source_rule() -> None:
    samples = all_samples(REPO / "models" / "current", CXR, OOD, keep_sources=TRAIN_ONLY_SOURCES)
    train_only = [s for s in samples if s.kind == "frontal" and s.source in TRAIN_ONLY_SOURCES]
    pooled = collections.Counter(gate_splits(train_only))
    per_source = collections.Counter(gate_splits(train_only, "per-source"))
    assert pooled == collections.Counter(gate_split(s) for s in train_only)
    assert "val" not in pooled and per_source["val"] > 0
    assert per_source["test"] == pooled["test"]  # the test images stay the same
