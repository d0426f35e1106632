"""ml.experiments.gate_distill: the student's terms are read with the served gate's arithmetic."""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from ml.experiments.gate_distill import (
    AXES,
    CascadeGate,
    StudentGate,
    logit,
    mixes,
    novel_inputs,
    screen_limits,
    variant,
)
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


def test_a_mixture_lies_between_a_plane_of_each_set() -> None:
    rng = np.random.default_rng(2)
    grey = np.zeros((6, 8, 8), np.float16)
    grey[3:] = 255  # planes 0-2 black, 3-5 white
    out = mixes(grey, np.arange(3), np.arange(3, 6), 200, rng)
    assert out.shape == (200, 8, 8) and out.dtype == np.float16
    level = out.astype(np.float32).reshape(200, -1)
    assert np.all(level.min(axis=1) == level.max(axis=1))  # one weight per mixture
    assert level.min() >= 0 and level.max() <= 255
    assert level[:, 0].std() > 50  # the weights spread over [0, 1], not one value


def test_the_screens_limits_keep_every_non_radiograph_out_with_the_margin() -> None:
    rng = np.random.default_rng(3)
    frontal = np.r_[np.ones(200, bool), np.zeros(40, bool)]
    p = np.r_[1 / (1 + np.exp(-rng.normal(6, 2, 200))), np.full(40, 0.01)]
    d = np.r_[rng.uniform(0.2, 2.0, 200), rng.uniform(3, 5, 40)]
    p[200], d[200] = 1 / (1 + np.exp(-5.0)), 0.3  # one non-radiograph among the radiographs
    for margin in (0.0, 1.0):
        p_min, d_max, cleared = screen_limits(p, d, frontal, margin)
        inside = (logit(p) > p_min - margin) & (d <= d_max)
        assert not inside[~frontal].any()
        assert cleared == np.mean((logit(p[frontal]) > p_min) & (d[frontal] <= d_max))
        assert 0.2 < cleared < 1.0  # it clears radiographs, not all of them
    # Without the close one, the distance alone keeps the others out: more is cleared.
    assert screen_limits(np.delete(p, 200), np.delete(d, 200), np.delete(frontal, 200),
                         1.0)[2] > cleared


def test_the_cascade_answers_what_the_screen_clears_and_otherwise_is_the_served_gate() -> None:
    rng = np.random.default_rng(4)
    gate = _gate(rng)
    features = rng.normal(size=(60, 100)) * rng.uniform(0.5, 3, (60, 1))
    stats = rng.normal(size=(60, len(STAT_NAMES)))
    stats[:, STAT_NAMES.index("std")] = rng.uniform(0.1, 0.3, 60)
    stats[0, STAT_NAMES.index("std")] = 0.0  # a flat image: never cleared
    z = gate.inputs(features, stats)[0]
    terms = np.c_[z @ gate.weights[:, :AXES].T, np.log((z * z).mean(axis=1))]
    student = StudentGate(**{f.name: getattr(gate, f.name) for f in fields(Gate)})
    attrs = [None] * 60
    attrs[1] = {"Modality": "CT"}  # tags decide first
    served = [a.reason for a in gate.assess(features, stats, attrs)]
    assert sum(r is None for r in served) < 55

    def cascade(screen: tuple[float, float]) -> list[str | None]:
        g = CascadeGate.around(gate, student, screen)
        return [a.reason for a in g.assess(np.c_[features, terms], stats, attrs)]

    assert cascade((np.inf, 0.0)) == served  # clears nothing
    everything = cascade((-np.inf, np.inf))
    assert everything[0] == "poor_quality" and everything[1] == served[1] is not None
    assert all(r is None for r in everything[2:])


def test_novel_inputs_are_the_films_turned_tiled_and_framed() -> None:
    rng = np.random.default_rng(5)
    planes = rng.uniform(0, 255, (6, 224, 224)).astype(np.float16)
    made = novel_inputs(planes, rng)
    assert set(made) == {"sideways", "upside_down", "contact_sheet", "screenshot"}
    assert all(m.shape == planes.shape for m in made.values())
    np.testing.assert_array_equal(made["sideways"][2], np.rot90(planes[2]))
    np.testing.assert_array_equal(made["upside_down"][3], planes[3][::-1])
    # Each quarter of a contact sheet is one of the films at half size.
    quarter = made["contact_sheet"][0][:112, :112]
    assert any(np.array_equal(quarter, p[::2, ::2]) for p in planes)
    # The screenshot: the film at half size in the middle, a bright bar above.
    np.testing.assert_array_equal(made["screenshot"][1][56:168, 56:168], planes[1][::2, ::2])
    assert made["screenshot"][1][:10].min() == 200
