"""The input gate: DICOM tags, image statistics, loading from the artifact, and the predictor's use of it."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.artifact import ArtifactError, read_metadata
from ml.gate import GATE_ARRAYS_FILE, GATE_FILE, STAT_NAMES, Gate, image_statistics, tag_reason
from ml.imaging import decode_image
from ml.predictor import INDETERMINATE, Predictor
from tests.conftest import FIXTURES


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    return target


def _xrays() -> list:
    return [decode_image(p.read_bytes()) for p in sorted(FIXTURES.glob("*.png"))]


@pytest.mark.parametrize(("attributes", "reason"), [
    ({"Modality": "CT"}, "other_modality"),
    ({"Modality": "MR", "ViewPosition": "PA"}, "other_modality"),
    ({"Modality": "DX", "ViewPosition": "LL"}, "not_frontal"),
    ({"Modality": "CR", "BodyPartExamined": "KNEE"}, "not_chest_xray"),
    ({"Modality": "DX", "ViewPosition": "PA", "BodyPartExamined": "CHEST"}, None),
    ({}, None),
    (None, None),
])
def test_dicom_tags_that_contradict_a_frontal_chest_xray_give_a_reason(attributes, reason):
    assert tag_reason(attributes) == reason


def test_image_statistics_tell_flat_and_noise_from_a_radiograph():
    xray = _xrays()[0]
    stats = image_statistics(xray.pixels, xray.attributes)
    flat = image_statistics(np.full((300, 200), 0.5, np.float32))
    noise = image_statistics(np.random.default_rng(0).random((400, 400)).astype(np.float32))
    index = STAT_NAMES.index
    assert stats.shape == (len(STAT_NAMES),) and np.isfinite(stats).all()
    assert flat[index("std")] == 0.0 and stats[index("std")] > 0.05
    assert noise[index("autocorr")] < 0.1 < 0.8 < stats[index("autocorr")]


def test_colourfulness_is_measured_before_the_grey_conversion():
    rng = np.random.default_rng(0)
    colour = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    grey = np.repeat(colour[..., :1], 3, axis=2)
    encoded = []
    for array in (colour, grey):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        encoded.append(decode_image(buf.getvalue()).attributes["colourfulness"])
    assert encoded[0] > 0.2 and encoded[1] == 0.0


def test_an_artifact_without_a_gate_is_refused_when_required_and_flagged_otherwise(model_copy: Path):
    (model_copy / GATE_FILE).unlink()
    with pytest.raises(ArtifactError) as err:
        Predictor.load(model_copy, require_gate=True)
    assert err.value.code == "no_gate" and "ml.training.gate" in err.value.message
    predictor = Predictor.load(model_copy)
    [result] = predictor.predict([np.full((64, 64), 0.5, np.float32)])
    assert result.gate_version is None and result.abstain_reason is None
    assert result.label in ("covid", "non-covid")


def test_a_gate_fitted_on_other_weights_or_tampered_with_is_unusable(model_copy: Path):
    meta = read_metadata(model_copy)
    info = json.loads((model_copy / GATE_FILE).read_text())
    (model_copy / GATE_FILE).write_text(json.dumps({**info, "weights_sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match="other weights"):
        Gate.load(model_copy, meta)
    (model_copy / GATE_FILE).write_text(json.dumps(info))
    with open(model_copy / GATE_ARRAYS_FILE, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(ArtifactError, match="sha256"):
        Gate.load(model_copy, meta)


def test_blank_images_abstain_and_radiographs_get_a_label(tiny_model_dir: Path):
    predictor = Predictor.load(tiny_model_dir, require_gate=True)
    xrays = _xrays()
    images = [x.pixels for x in xrays] + [np.full((128, 128), 0.4, np.float32)]
    results = predictor.predict(images, explain=True, attributes=[x.attributes for x in xrays] + [{}])
    for r in results[:-1]:
        assert r.abstain_reason is None and r.label in ("covid", "non-covid") and r.heatmap_png
        assert r.gate_version == predictor.gate.version and 0.0 <= r.gate_frontal_probability <= 1.0
    blank = results[-1]
    assert blank.label == INDETERMINATE and blank.abstain_reason == "poor_quality"
    assert blank.heatmap_png is None and 0.0 <= blank.probability_covid <= 1.0  # kept for audit


def test_dicom_tags_decide_even_when_the_pixels_look_frontal(tiny_model_dir: Path):
    predictor = Predictor.load(tiny_model_dir, require_gate=True)
    xray = _xrays()[0]
    [r] = predictor.predict([xray.pixels], attributes=[{"Modality": "CT"}])
    assert (r.label, r.abstain_reason) == (INDETERMINATE, "other_modality")


def test_thresholds_come_from_the_artifact(model_copy: Path):
    info = json.loads((model_copy / GATE_FILE).read_text())
    info["thresholds"]["min_frontal_probability"] = 1.01  # nothing is frontal enough
    (model_copy / GATE_FILE).write_text(json.dumps(info))
    predictor = Predictor.load(model_copy, require_gate=True)
    assert predictor.gate.min_frontal_probability == 1.01
    results = predictor.predict([x.pixels for x in _xrays()])
    assert all(r.label == INDETERMINATE and r.abstain_reason for r in results)


def _polarity_gate(polarity: np.ndarray | None, other: float = 0.0) -> Gate:
    """A two-feature gate whose kind classifier calls images with feature 0 > 0 inverted (and,
    with other > 0, "other" next)."""
    from ml.training.gate import CLASSES, make_gate

    stats = len(STAT_NAMES)
    weights = np.zeros((len(CLASSES), 2 + stats))
    weights[CLASSES.index("inverted"), 0] = 4.0
    weights[CLASSES.index("other"), 0] = other
    arrays = {"feature_mean": np.zeros(2), "components": np.eye(2), "component_scale": np.ones(2),
              "stat_mean": np.zeros(stats), "stat_scale": np.ones(stats), "weights": weights,
              "bias": np.where(np.array(CLASSES) == "frontal", 5.0, 0.0)}
    if polarity is not None:
        arrays["polarity"] = polarity
    return make_gate(arrays)


def test_the_polarity_model_clears_a_film_called_inverted_but_never_accuses_one():
    stats = np.zeros((3, len(STAT_NAMES)), np.float32)
    stats[:, STAT_NAMES.index("std")] = 0.2
    m = STAT_NAMES.index("mediastinum_minus_lungs")
    stats[:, m] = [0.3, 0.3, -0.3]  # mediastinum brighter than the lungs: a positive film
    features = np.array([[3.0, 0.0], [-3.0, 0.0], [3.0, 0.0]], np.float32)
    # polarity log-odds: -50 x mediastinum_minus_lungs (a positive film: -15; its negative: +15)
    polarity = np.zeros(len(STAT_NAMES) + 1)
    polarity[m] = -50.0
    without, _ = _polarity_gate(None).scores(features, stats)
    with_, _ = _polarity_gate(polarity).scores(features, stats)
    frontal = 0
    assert without[0, frontal] < 0.1 and with_[0, frontal] > 0.9  # called inverted, cleared
    # a film the kind classifier answers stays answered; a negative it calls inverted stays
    # exactly as it was: the polarity model may lower "inverted", never raise it
    assert abs(with_[1, frontal] - without[1, frontal]) < 1e-6 and with_[1, frontal] > 0.9
    np.testing.assert_allclose(with_[2], without[2], rtol=1e-6)
    assert with_[2, frontal] < 0.1


def test_inverted_is_the_reason_only_where_the_polarity_model_says_negative():
    """A page of text can look "inverted" to the kind classifier; the word is kept for images
    the polarity model takes for a radiograph's negative, the abstention is kept for all."""
    stats = np.zeros((2, len(STAT_NAMES)), np.float32)
    stats[:, STAT_NAMES.index("std")] = 0.2
    m = STAT_NAMES.index("mediastinum_minus_lungs")
    stats[:, m] = [0.02, -0.02]  # log-odds -1 (not a negative, too weakly to clear it), +1
    polarity = np.zeros(len(STAT_NAMES) + 1)
    polarity[m] = -50.0
    features = np.array([[3.0, 0.0], [3.0, 0.0]], np.float32)  # inverted 12, other 6, frontal 5
    attrs = [None, None]
    old = _polarity_gate(None, other=2.0).assess(features, stats, attrs)
    new = _polarity_gate(polarity, other=2.0).assess(features, stats, attrs)
    assert [a.reason for a in old] == ["inverted", "inverted"]
    assert [a.reason for a in new] == ["not_chest_xray", "inverted"]
    assert all(a.frontal_probability < 0.01 for a in new)  # both still abstained on


def test_a_gate_with_a_malformed_polarity_model_is_unusable(model_copy: Path):
    from ml.artifact import sha256_file

    meta = read_metadata(model_copy)
    assert Gate.load(model_copy, meta).polarity is None  # a gate from before it still loads
    with np.load(model_copy / GATE_ARRAYS_FILE) as npz:
        arrays = {k: npz[k] for k in npz.files}

    def write(polarity: np.ndarray) -> None:
        np.savez(model_copy / GATE_ARRAYS_FILE, **{**arrays, "polarity": polarity})
        info = json.loads((model_copy / GATE_FILE).read_text())
        info["arrays_sha256"] = sha256_file(model_copy / GATE_ARRAYS_FILE)
        (model_copy / GATE_FILE).write_text(json.dumps(info))

    write(np.zeros(len(STAT_NAMES) + 1, np.float32))
    assert Gate.load(model_copy, meta).polarity.shape == (len(STAT_NAMES) + 1,)
    write(np.zeros(3, np.float32))
    with pytest.raises(ArtifactError, match="polarity"):
        Gate.load(model_copy, meta)


def test_report_only_refuses_a_model_without_a_gate_before_reading_images(model_copy: Path,
                                                                           capsys):
    from ml.training.gate import main

    (model_copy / GATE_FILE).unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model_copy), "--report-only", "--cxr", "/nonexistent"])
    assert exit_info.value.code == 2
    assert "has no input gate to measure" in capsys.readouterr().err


def test_grey_levels_counts_the_distinct_levels_of_the_sample() -> None:
    rng = np.random.default_rng(5)
    few = rng.integers(0, 3, (200, 150)).astype(np.float32) / 2  # 3 levels
    many = rng.random((256, 256), dtype=np.float32)
    index = STAT_NAMES.index("grey_levels")
    for image, step in ((few, 1), (many, 2)):
        sample = image[::step, ::step]
        expected = len(np.unique(np.rint(sample * 255).astype(np.uint8))) / 256.0
        assert image_statistics(image)[index] == np.float32(expected)
    assert image_statistics(few)[index] == np.float32(3 / 256)
