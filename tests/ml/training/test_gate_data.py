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


def test_cross_validation_keeps_a_patient_and_the_images_made_from_it_in_one_fold() -> None:
    from ml.training.gate_data import cv_folds, cv_groups

    samples = all_samples(REPO / "models" / "current", CXR, OOD, keep_sources=TRAIN_ONLY_SOURCES)
    groups = cv_groups(samples, CXR, OOD)
    folds = cv_folds(groups)
    assert set(folds) == {0, 1, 2, 3, 4}
    fold_of_group: dict[str, int] = {}
    for group, fold in zip(groups, folds, strict=True):
        assert fold_of_group.setdefault(group, fold) == fold
    by_key = dict(zip((s.key for s in samples), folds, strict=True))
    made = [s for s in samples if s.kind in ("inverted", "poor_exposure")]
    assert made and all(by_key[s.key] == by_key.get(s.key.split(":", 1)[1], by_key[s.key])
                        for s in made)
    patients = collections.Counter(groups[[s.kind == "frontal" for s in samples]])
    assert max(patients.values()) > 1  # real patients with several films, kept together


def _synthetic(rng: np.random.Generator, test_shift: float = 0.0):
    """Samples and data for fit_gate: two radiograph sources (a small one off-centre) in the
    train and val splits, every other class in train, and test images (shifted by test_shift)."""
    from ml.training.gate import CLASSES
    from ml.training.gate_data import Sample

    rows, samples = [], []

    def add(kind: str, split: str, source: str, x: np.ndarray) -> None:
        for row in x:
            samples.append(Sample(f"{source}:{kind}:{split}:{len(samples)}", kind, split, source,
                                  "normal", lambda: None))
            rows.append(row)

    for split, n in (("train", 300), ("val", 100), ("test", 60)):
        shift = test_shift if split == "test" else 0.0
        add("frontal", split, "big", rng.normal(shift, 1.0, (n, 8)))
        add("frontal", split, "small", rng.normal(2.5 + shift, 1.0, (n // 2, 8)))
    kinds = {"lateral": "lateral_xray", "ct": "ct", "other": "photo", "inverted": "inverted",
             "poor": "poor_exposure"}
    for i, name in enumerate(CLASSES[1:]):
        add(kinds[name], "train", "made", rng.normal(6.0 + i, 1.0, (30, 8)))
    features = np.stack(rows)
    stats = np.zeros((len(features), len(STAT_NAMES)))
    stats[:, STAT_NAMES.index("std")] = 0.2  # not blank
    return samples, {"features": features, "stats": stats}


def test_cross_validated_thresholds_meet_the_target_per_source_and_never_read_test(
        small_artifact) -> None:
    import pytest

    from ml.training.gate import CV_TARGET, fit_gate

    model_dir, _ = small_artifact
    samples, data = _synthetic(np.random.default_rng(0))
    groups = np.array([s.key for s in samples])
    with pytest.raises(ValueError, match="group"):
        fit_gate(model_dir, samples, data, components=4, c=1.0, rule="cross-validated")
    gate, info = fit_gate(model_dir, samples, data, components=4, c=1.0, rule="cross-validated",
                          groups=groups)
    chosen = info["thresholds"]
    assert chosen["rule"] == "cross-validated" and "out-of-fold" in chosen["chosen_on"]
    assert chosen["frontal_abstain_target_each"] == CV_TARGET
    assert info["summary"]["cross_validation"]["radiographs"] == 600  # train and val, not test
    # On new patients of each source (fresh draws) the gate abstains near the target, a
    # threshold each; it still refuses fresh images of every other kind.
    rng = np.random.default_rng(1)
    fresh = {"big": rng.normal(0.0, 1.0, (2000, 8)), "small": rng.normal(2.5, 1.0, (2000, 8))}
    blank = np.zeros((2000, len(STAT_NAMES)))
    blank[:, STAT_NAMES.index("std")] = 0.2
    for source, x in fresh.items():
        rate = np.mean([v.reason is not None for v in gate.assess(x, blank, [None] * 2000)])
        assert rate <= 2 * CV_TARGET + 0.01, source
    for i in range(5):
        x = rng.normal(6.0 + i, 1.0, (200, 8))
        assert all(v.reason for v in gate.assess(x, blank[:200], [None] * 200))
    # Test images play no part: moved far away, the thresholds stay the same.
    moved_samples, moved = _synthetic(np.random.default_rng(0), test_shift=9.0)
    _, again = fit_gate(model_dir, moved_samples, moved, components=4, c=1.0,
                        rule="cross-validated", groups=groups)
    assert again["thresholds"]["max_distance"] == chosen["max_distance"]
    assert again["thresholds"]["min_frontal_probability"] == chosen["min_frontal_probability"]


def test_inverted_pairs_are_each_film_s_negative_kept_in_its_fold_and_fit_only_polarity() -> None:
    from ml.training.gate import fit_arrays
    from ml.training.gate_data import cv_folds, cv_groups, inverted_pairs

    samples = all_samples(REPO / "models" / "current", CXR, OOD, keep_sources=TRAIN_ONLY_SOURCES)
    bases = [s for s in samples if s.kind == "frontal" and gate_split(s) == "train"][:40]
    pairs = inverted_pairs(bases)
    film, negative = bases[0].load()[0], pairs[0].load()[0]
    np.testing.assert_allclose(negative, 1.0 - film)
    assert {p.kind for p in pairs} == {"inverse"} and {p.split for p in pairs} == {"train"}
    folds = dict(zip((s.key for s in bases + pairs),
                     cv_folds(cv_groups(bases + pairs, CXR, OOD)), strict=True))
    assert all(folds[p.key] == folds[b.key] for b, p in zip(bases, pairs, strict=True))

    # On made data: the polarity model tells films from their negatives by the statistics; the
    # rest of the gate is fitted exactly as without the pairs.
    rng = np.random.default_rng(0)
    m = STAT_NAMES.index("mediastinum_minus_lungs")
    n = 200
    features = rng.normal(0, 1, (n, 6))
    stats = rng.normal(0, 1, (n, len(STAT_NAMES)))
    stats[:, m] = np.abs(stats[:, m]) + 0.05
    classes = np.array(["frontal"] * 100 + ["lateral", "ct", "other", "inverted", "poor"] * 20)
    features[100:] += 4.0
    negatives = stats[:100].copy()
    negatives[:, m] *= -1
    plain = fit_arrays(features, stats, classes, components=4, c=1.0)
    paired = fit_arrays(np.concatenate([features, features[:100]]),
                        np.concatenate([stats, negatives]),
                        np.concatenate([classes, ["inverted"] * 100]), components=4, c=1.0,
                        inverses=np.r_[np.zeros(n, bool), np.ones(100, bool)])
    assert "polarity" not in plain
    for name, value in plain.items():
        np.testing.assert_allclose(paired[name], value, rtol=1e-5, atol=1e-6)
    z = (np.concatenate([stats[:100], negatives]) - paired["stat_mean"]) / paired["stat_scale"]
    log_odds = z @ paired["polarity"][:-1] + paired["polarity"][-1]
    assert (log_odds[:100] < 0).all() and (log_odds[100:] > 0).all()
