"""The reference model shipped in models/current is what the service serves by default."""

from __future__ import annotations

from pathlib import Path

from ml.artifact import read_metadata
from ml.imaging import decode_image
from ml.predictor import Predictor
from tests.conftest import FIXTURES, REPO

CURRENT = REPO / "models" / "current"


def test_current_is_a_trained_compact_artifact_with_a_model_card():
    meta = read_metadata(CURRENT)
    assert meta.trained and meta.model_version.startswith("resnet50-cxr-")
    assert (CURRENT / meta.weights_file).stat().st_size <= 50 * 2**20
    assert meta.weights_dtype == "float16"
    assert 0.0 < meta.threshold < 1.0 and meta.metrics["split"] == "val"
    card = (CURRENT / "MODEL_CARD.md").read_text()
    assert "Research use only" in card and meta.model_version in card
    assert Path(CURRENT.resolve()).name == meta.model_version  # current points at a versioned folder


def test_current_model_predicts_the_licensed_fixtures():
    predictor = Predictor.load(CURRENT, backend="keras")
    images = [decode_image(p.read_bytes()).pixels for p in sorted(FIXTURES.glob("*.png"))]
    results = predictor.predict(images, explain=True)
    assert len(results) == 3
    for r in results:
        assert r.trained and 0.0 <= r.probability_covid <= 1.0 and r.heatmap_png
