"""Tests for ml.predictor: loading an artifact and classifying images with it."""


import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.artifact import (
    ArtifactError,
    ModelMetadata,
    load_weight_arrays,
)
from ml.model import build_resnet50
from ml.predictor import Prediction, Predictor
from ml.preprocess import PREPROCESS_VERSION, preprocess_batch
from tests.ml.conftest import SIZE, edit_metadata, random_images


def test_predict_matches_keras_model(predictor: Predictor, cli_run: tuple[Path, str]) -> None:
    images = random_images()
    predictions = predictor.predict(images)
    assert len(predictions) == 3 and all(isinstance(p, Prediction) for p in predictions)

    reference = build_resnet50(input_size=SIZE)
    reference.set_weights(load_weight_arrays(cli_run[0], predictor.metadata))
    expected = np.asarray(reference(preprocess_batch(images, size=SIZE), training=False)).reshape(
        -1
    )
    np.testing.assert_allclose([p.probability_covid for p in predictions], expected, atol=1e-5)


def test_prediction_carries_provenance(predictor: Predictor) -> None:
    meta = predictor.metadata
    for p in predictor.predict(random_images()):
        assert p.model_version == meta.model_version and p.model_sha256 == meta.weights_sha256
        assert p.preprocess_version == PREPROCESS_VERSION and p.threshold == meta.threshold
        assert p.trained is False and p.heatmap_png is None
        assert p.inference_ms > 0.0
        assert p.label == ("covid" if p.probability_covid >= p.threshold else "non-covid")


def test_model_trained_with_an_older_preprocessing_is_served_with_it(
    cli_run: tuple[Path, str], tmp_path: Path
) -> None:
    model_dir = tmp_path / "v1-model"
    shutil.copytree(cli_run[0], model_dir)
    edit_metadata(model_dir, preprocess_version="1")
    v1 = Predictor.load(model_dir)
    images = random_images()
    predictions = v1.predict(images)
    assert {p.preprocess_version for p in predictions} == {"1"}

    reference = build_resnet50(input_size=SIZE)
    reference.set_weights(load_weight_arrays(model_dir, v1.metadata))
    batch = preprocess_batch(images, size=SIZE, version="1")
    expected = np.asarray(reference(batch, training=False)).reshape(-1)
    np.testing.assert_allclose([p.probability_covid for p in predictions], expected, atol=1e-5)


def test_label_follows_threshold(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    images = random_images()
    probs = sorted(p.probability_covid for p in predictor.predict(images))
    for threshold, expected in [(0.0, {"covid"}), (np.nextafter(probs[-1], 2.0), {"non-covid"})]:
        monkeypatch.setattr(
            predictor,
            "metadata",
            dataclasses.replace(predictor.metadata, threshold=float(threshold)),
        )
        assert {p.label for p in predictor.predict(images)} == expected
    # Exactly at the threshold counts as covid.
    monkeypatch.setattr(
        predictor, "metadata", dataclasses.replace(predictor.metadata, threshold=probs[0])
    )
    labels = [p.label for p in predictor.predict(images)]
    assert labels.count("covid") >= 1


def test_explain_returns_overlay_png(predictor: Predictor) -> None:
    images = random_images()
    predictions = predictor.predict(images, explain=True)
    for image, p in zip(images, predictions, strict=True):
        assert p.heatmap_png is not None and p.heatmap_png.startswith(b"\x89PNG")
        overlay = Image.open(io.BytesIO(p.heatmap_png))
        assert overlay.mode == "RGB" and overlay.size == (image.shape[1], image.shape[0])


def test_predict_empty_batch(predictor: Predictor) -> None:
    assert predictor.predict([]) == []


def test_load_missing_model_is_no_model(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as exc:
        Predictor.load(tmp_path / "absent")
    assert exc.value.code == "no_model"


def test_load_weights_that_do_not_fit_is_invalid(
    small_artifact: tuple[Path, ModelMetadata],
) -> None:
    with pytest.raises(ArtifactError) as exc:
        Predictor.load(small_artifact[0])
    assert exc.value.code == "invalid_model"
