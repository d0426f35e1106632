"""ml.experiments.gate_distill: the student's terms are read with the served gate's arithmetic."""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from ml.experiments.gate_distill import AXES, StudentGate, variant
from ml.gate import STAT_NAMES, Gate
from ml.training.gate import CLASSES, fit_arrays, make_gate


def _gate(rng: np.random.Generator) -> Gate:
    # A fitted gate on 100-dimensional features: frontal images near the origin, others apart.
    # 120 radiographs (more than AXES, so that the gate has all its axes), 40 of each other kind.
    classes = np.r_[np.repeat(CLASSES, [120, 40, 40, 40, 40, 40]), np.repeat("inverted", 40)]
    offset = np.array([CLASSES.index(c) for c in classes], np.float32)[:, None]
    features = rng.normal(size=(len(classes), 100)) + 3 * offset * (np.arange(100) % 6 == offset)
    stats = rng.normal(size=(len(classes), len(STAT_NAMES))) + offset
    inverses = np.arange(len(classes)) >= 320  # the polarity model's negatives
    arrays = fit_arrays(features, stats, classes, components=AXES, inverses=inverses)
    return make_gate(arrays, 0.5, 2.0)


def test_the_teachers_exact_terms_give_the_served_gates_scores_and_verdicts() -> None:
    rng = np.random.default_rng(0)
    gate = _gate(rng)
    features = rng.normal(size=(50, 100)) * rng.uniform(0.5, 3, (50, 1))
    stats = rng.normal(size=(50, len(STAT_NAMES)))
    z = gate.inputs(features, stats)[0]
    terms = np.c_[z @ gate.weights[:, :AXES].T, np.log((z * z).mean(axis=1))]
    student = StudentGate(**{f.name: getattr(gate, f.name) for f in fields(Gate)})
    p, d = gate.scores(features, stats)
    sp, sd = student.scores(terms, stats)
    np.testing.assert_allclose(sp, p, atol=1e-5)
    np.testing.assert_allclose(sd, d, rtol=1e-5)
    verdicts = [a.reason for a in gate.assess(features, stats, [None] * 50)]
    assert verdicts == [a.reason for a in student.assess(terms, stats, [None] * 50)]
    assert len(set(verdicts)) > 1  # the check compares answers and abstentions, not one kind
    # A student that misses the axes' part of the frontal logit changes the verdicts.
    off = terms.copy()
    off[:, 0] -= 20.0
    assert all(a.reason is not None for a in student.assess(off, stats, [None] * 50))


def test_a_variant_is_a_grey_plane_of_the_same_size_and_range() -> None:
    rng = np.random.default_rng(1)
    plane = np.tile(np.linspace(0, 255, 224, dtype=np.float32), (224, 1))
    out = variant(plane, rng)
    assert out.shape == plane.shape and out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, plane)
