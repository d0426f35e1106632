"""ml.experiments.gate_generic: ImageNet features for the input gate, measured against the
classifier's own (research only; the figures are in docs/experiments/gate/README.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from ml.experiments import gate_generic
from ml.imaging import decode_image
from ml.preprocess import PREPROCESS_VERSION, preprocess_batch
from tests.conftest import real_xray_paths

SIZE = 64


@dataclass(frozen=True)
class XraySample:
    """What generic_features reads of a gate sample: its key and its decoded pixels."""

    path: object

    @property
    def key(self) -> str:
        return self.path.name

    def load(self):
        decoded = decode_image(self.path.read_bytes())
        return decoded.pixels, decoded.attributes


@pytest.fixture(scope="module")
def samples() -> list[XraySample]:
    return [XraySample(p) for p in real_xray_paths(3)]


def test_features_come_from_the_imagenet_weights_and_are_cached(samples, tmp_path, monkeypatch):
    cache = tmp_path / "generic.npz"
    features = gate_generic.generic_features(samples, cache, SIZE, PREPROCESS_VERSION)
    assert features.shape == (3, 1280) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])  # the images differ, so do their features
    # The installed ImageNet checkpoint, not a random initialisation: a second build agrees.
    again = gate_generic.imagenet_backbone(SIZE).predict(
        preprocess_batch([s.load()[0] for s in samples], size=SIZE, version=PREPROCESS_VERSION), verbose=0)
    np.testing.assert_allclose(again, features, rtol=1e-4, atol=1e-5)

    def no_backbone(size):
        raise AssertionError("cached features were computed again")

    monkeypatch.setattr(gate_generic, "imagenet_backbone", no_backbone)
    np.testing.assert_array_equal(gate_generic.generic_features(samples, cache, SIZE, PREPROCESS_VERSION),
                                  features)


def test_the_costed_onnx_export_is_the_same_network(samples, tmp_path):
    batch = preprocess_batch([s.load()[0] for s in samples], size=SIZE, version=PREPROCESS_VERSION)
    session = gate_generic.onnx_backbone(SIZE, tmp_path / "b.onnx")
    (onnx_features,) = session.run(None, {"image": batch})
    keras_features = gate_generic.imagenet_backbone(SIZE).predict(batch, verbose=0)
    np.testing.assert_allclose(onnx_features, keras_features, rtol=1e-3, atol=1e-4)
