"""The input gate's screen (ml/gate.py Screen, ml/training/gate_screen.py): a small network in
front of the gate's own; what it clears is answered without that network, the rest gets the
gate's own verdict, and it is bound to the gate it was distilled from."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ml.artifact import ArtifactError, read_metadata
from ml.gate import FLAT_STD, GATE_FILE, STAT_NAMES, Gate, Screen, logit
from ml.gate_features import SCREEN_FILE, SCREEN_SOURCE
from ml.imaging import decode_image
from ml.predictor import INDETERMINATE, Predictor
from ml.training.gate import CLASSES, fit_arrays, make_gate
from ml.training.gate_quick import fit_quick_gate, fit_quick_screen
from ml.training.gate_screen import gate_terms, screen_limits
from tests.conftest import CXR_DIR, FIXTURES, real_xray_paths
from worker.batching import Batcher

OOD = CXR_DIR.parent / "ood"


class Counting:
    """A network that records how many images it was run on."""

    def __init__(self, run):
        self.run, self.images = run, 0

    def __call__(self, batch):
        self.images += len(batch)
        return self.run(batch)


def _gate(rng: np.random.Generator) -> Gate:
    # Fitted on 100-dimensional features: frontal images near the origin, other kinds apart.
    classes = np.r_[np.repeat(CLASSES, [120, 40, 40, 40, 40, 40]), np.repeat("inverted", 40)]
    offset = np.array([CLASSES.index(c) for c in classes], np.float32)[:, None]
    features = rng.normal(size=(len(classes), 100)) + 3 * offset * (np.arange(100) % 6 == offset)
    stats = rng.normal(size=(len(classes), len(STAT_NAMES))) + offset
    arrays = fit_arrays(features, stats, classes, components=64,
                        inverses=np.arange(len(classes)) >= 320)
    return make_gate(arrays, 0.5, 2.0)


def _inputs(rng: np.random.Generator, n: int = 80) -> tuple[np.ndarray, np.ndarray]:
    features = (rng.normal(size=(n, 100)) * rng.uniform(0.3, 3, (n, 1))).astype(np.float32)
    stats = rng.normal(size=(n, len(STAT_NAMES))).astype(np.float32) * 0.5
    stats[:, STAT_NAMES.index("std")] = rng.uniform(0.1, 0.3, n)
    return features, stats


def test_exact_terms_give_the_gates_own_scores() -> None:
    rng = np.random.default_rng(0)
    gate = _gate(rng)
    features, stats = _inputs(rng)
    p, d = gate.scores(features, stats)
    tp, td = gate.terms_scores(gate_terms(gate, features)["gate"], stats)
    np.testing.assert_allclose(tp, p, atol=1e-5)
    np.testing.assert_allclose(td, d, rtol=1e-4)


def test_behind_a_screen_the_network_runs_only_on_what_it_leaves_and_verdicts_stay() -> None:
    rng = np.random.default_rng(1)
    served = _gate(rng)
    features, stats = _inputs(rng)
    stats[0, STAT_NAMES.index("std")] = FLAT_STD / 2  # a blank image: never cleared
    attrs: list = [None] * len(features)
    attrs[1] = {"Modality": "CT"}  # tags decide first, cleared or not
    network = Counting(lambda batch: batch)  # the "batch" is the features themselves here
    served = replace(served, extractor=network)
    expected = served.assess(features, stats, attrs)
    p, d = served.scores(features, stats)
    # A screen that knows the network's terms exactly, with limits inside the gate's thresholds.
    screen = Screen(Counting(lambda batch: gate_terms(served, batch)["gate"]),
                    float(logit(0.9)), 0.8 * served.max_distance, {})
    gate = replace(served, screen=screen)
    cleared = gate.cleared(screen.network.run(features), stats)
    assert 10 < cleared.sum() < len(features) - 10
    assert not cleared[0] and cleared[1]
    np.testing.assert_array_equal(
        cleared[2:], ((p[:, 0] > 0.9) & (d <= 0.8 * served.max_distance))[2:])

    network.images = 0
    out = gate.features(features, stats)
    assert network.images == len(features) - cleared.sum()  # the network spared what was cleared
    assert np.isnan(out[cleared, :100]).all() and np.isfinite(out[~cleared]).all()
    verdicts = gate.assess(out, stats, attrs)
    assert [a.reason for a in verdicts] == [a.reason for a in expected]
    assert verdicts[1].reason == "other_modality" and verdicts[0].reason == "poor_quality"
    # Without the statistics the network runs on every image; the verdicts are the same.
    network.images = 0
    again = gate.assess(gate.features(features), stats, attrs)
    assert network.images == len(features)
    assert [(a.reason, a.frontal_probability) for a in again] == [
        (a.reason, a.frontal_probability) for a in verdicts]
    # Statistics that change after the network ran cannot make up features it never computed.
    changed = stats.copy()
    changed[:, STAT_NAMES.index("std")] = 0.0
    with pytest.raises(ValueError, match="did not run"):
        gate.assess(out, changed, attrs)


def test_a_lenient_screen_answers_what_it_clears_and_nothing_else_changes() -> None:
    rng = np.random.default_rng(2)
    served = _gate(rng)
    features, stats = _inputs(rng)
    terms = gate_terms(served, features)["gate"]
    terms[::2, 0] += 30.0  # a student that calls every other image frontal and typical
    terms[::2, -1] = np.log(0.1)
    gate = replace(served, screen=Screen(None, 5.0, served.max_distance, {}))
    expected = [a.reason for a in served.assess(features, stats, [None] * len(features))]
    got = [a.reason for a in gate.assess(np.c_[features, terms], stats, [None] * len(features))]
    assert all(r is None for r in got[::2])
    assert got[1::2] == expected[1::2]
    assert any(r is not None for r in expected[::2])  # so the screen did answer for the gate


def test_the_limits_keep_every_validation_non_radiograph_out_by_the_margin() -> None:
    rng = np.random.default_rng(3)
    frontal = np.r_[np.ones(200, bool), np.zeros(40, bool)]
    p = np.r_[1 / (1 + np.exp(-rng.normal(6, 2, 200))), np.full(40, 0.01)]
    d = np.r_[rng.uniform(0.2, 2.0, 200), rng.uniform(3, 5, 40)]
    p[200], d[200] = 1 / (1 + np.exp(-5.0)), 0.3  # one non-radiograph among the radiographs
    for margin in (0.0, 3.0):
        p_min, d_max, cleared = screen_limits(p, d, frontal, margin)
        assert not ((logit(p) > p_min - margin + 1e-9) & (d <= d_max))[~frontal].any()
        assert cleared == np.mean((logit(p[frontal]) > p_min) & (d[frontal] <= d_max))
        assert 0.05 < cleared < 1.0
    # With no non-radiograph at all the limits are finite and clear every radiograph.
    p_min, d_max, cleared = screen_limits(p[:200], d[:200], frontal[:200], 3.0)
    assert np.isfinite(p_min) and cleared == 1.0


@pytest.fixture(scope="module")
def screened_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, a quick gate on its own ImageNet network at 32 px, and a quick screen."""
    root = tmp_path_factory.mktemp("screened")
    model_dir = root / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    fixtures = sorted(FIXTURES.glob("*.png"))
    fit_quick_gate(model_dir, CXR_DIR, OOD, fixtures, own_features_size=32)
    fit_quick_screen(model_dir, CXR_DIR, OOD, root / "work", fixtures)
    return model_dir


def test_the_screen_is_written_into_the_artifact_bound_to_its_gate(screened_dir: Path) -> None:
    info = json.loads((screened_dir / GATE_FILE).read_text())
    block = info["screen"]
    assert block["source"] == SCREEN_SOURCE and block["file"] == SCREEN_FILE
    assert info["version"] == f"gate-1-{info['arrays_sha256'][:8]}-screen-{block['sha256'][:8]}"
    assert block["gate_arrays_sha256"] == info["arrays_sha256"]
    assert block["gate_network_sha256"] == info["features"]["sha256"]
    assert np.isfinite(block["limits"]["min_logit_frontal"]) and block["limits"]["margin"] == 2.0
    assert block["validation"]["others_cleared"] == 0  # what the limits are chosen to hold
    gate = Gate.load(screened_dir, read_metadata(screened_dir))
    assert gate is not None and gate.screen is not None and gate.version == info["version"]
    assert gate.screen.min_logit_frontal == block["limits"]["min_logit_frontal"]


def test_a_changed_missing_or_foreign_screen_is_refused(screened_dir: Path, tmp_path: Path) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(screened_dir, changed)
    (changed / SCREEN_FILE).write_bytes((changed / SCREEN_FILE).read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        Predictor.load(changed, backend="keras", require_gate=True)
    (changed / SCREEN_FILE).unlink()
    with pytest.raises(ArtifactError, match="screen network gate_screen.onnx is missing"):
        Predictor.load(changed, backend="keras", require_gate=True)
    shutil.copy(screened_dir / SCREEN_FILE, changed / SCREEN_FILE)
    info = json.loads((changed / GATE_FILE).read_text())
    info["screen"]["gate_arrays_sha256"] = "0" * 64  # distilled from another gate
    (changed / GATE_FILE).write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match="distilled from another gate"):
        Predictor.load(changed, backend="keras", require_gate=True)


def _images() -> list[np.ndarray]:
    ood = sorted((OOD / "images" / "lateral_xray").iterdir())[:2]
    return ([decode_image(p.read_bytes()).pixels for p in real_xray_paths(6) + ood]
            + [np.full((64, 64), 0.5, np.float32)])


def test_served_verdicts_are_the_screens_where_it_clears_and_the_gates_elsewhere(
        screened_dir: Path) -> None:
    predictor = Predictor.load(screened_dir, backend="keras", require_gate=True)
    gate = predictor.gate
    assert gate is not None and gate.screen is not None
    images = _images()
    results = predictor.predict(images)
    assert results[-1].label == INDETERMINATE and results[-1].abstain_reason == "poor_quality"
    batch = predictor.preprocess(images)
    stats = np.stack([predictor.statistics(i) for i in images])
    cleared = gate.cleared(gate.screen.network(batch), stats)
    served = replace(gate, screen=None).assess(gate.extractor(batch), stats, [None] * len(images))
    for r, c, s in zip(results, cleared, served, strict=True):
        assert r.gate_version == gate.version
        if c:
            assert r.abstain_reason is None and r.label in ("covid", "non-covid")
        else:
            assert r.abstain_reason == s.reason
            assert r.gate_frontal_probability == pytest.approx(s.frontal_probability, rel=1e-4)


def test_the_worker_hands_the_statistics_over_and_the_network_skips_what_is_cleared(
        screened_dir: Path) -> None:
    predictor = Predictor.load(screened_dir, backend="keras", require_gate=True)
    gate = predictor.gate
    assert gate is not None and gate.screen is not None
    counting = Counting(gate.extractor)
    predictor.gate = replace(gate, extractor=counting)
    images = _images()
    stats = [predictor.statistics(i) for i in images]
    batch = predictor.preprocess(images)
    cleared = gate.cleared(gate.screen.network(batch), np.stack(stats))
    # So that the check means something, the quick screen must clear some and leave some.
    assert 0 < cleared.sum() < len(images)
    batcher = Batcher(predictor, max_size=16, max_wait_ms=1)
    with batcher.announce() as ticket:
        results = ticket.submit(batch, images, explain=False, statistics=stats)
    assert counting.images == len(images) - cleared.sum()
    assert [r.abstain_reason is None for r in results][:len(images)] == [
        r.abstain_reason is None for r in predictor.predict(images)]
