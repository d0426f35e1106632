"""The input gate's own feature network (ml/gate_features.py): EfficientNet-Lite0 with its
ImageNet weights, exported into the artifact, bound to the gate by sha256, and served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from ml.artifact import ArtifactError, read_metadata
from ml.efficientnet_lite import build_efficientnet_lite_classifier
from ml.gate import GATE_FILE, Gate, image_statistics
from ml.gate_features import FILE, SOURCE, GateFeatures, export
from ml.imaging import decode_image
from ml.predictor import INDETERMINATE, Predictor
from ml.preprocess import preprocess_batch
from ml.training.gate_quick import fit_quick_gate
from tests.conftest import CXR_DIR, FIXTURES, real_xray_paths

SIZE = 32


def _xrays(n: int = 3) -> list[np.ndarray]:
    return [decode_image(p.read_bytes()).pixels for p in real_xray_paths(n)]


@pytest.fixture(scope="module")
def own_gate_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a quick gate that reads its own ImageNet network at 32 px."""
    model_dir = tmp_path_factory.mktemp("own-gate") / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    fit_quick_gate(model_dir, CXR_DIR, CXR_DIR.parent / "ood", sorted(FIXTURES.glob("*.png")),
                   own_features_size=SIZE)
    return model_dir


def test_export_is_lite0_with_its_imagenet_weights_on_the_classifiers_batch(
        tiny_model_dir: Path, tmp_path: Path):
    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    meta = read_metadata(model_dir)
    block = export(model_dir, SIZE)
    assert block["source"] == SOURCE and block["file"] == FILE and block["input_size"] == SIZE
    assert block["dimensions"] == 1280 and len(block["sha256"]) == 64
    extractor = GateFeatures.load(model_dir, block)
    batch = preprocess_batch(_xrays(), size=meta.input_size, version=meta.preprocess_version)
    features = extractor(batch)  # the classifier's own input batch, resized inside the network
    assert features.shape == (3, 1280) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])
    # The same numbers as the Keras network with the installed ImageNet checkpoint (a random
    # initialisation would not reproduce them) on the batch resized to its input.
    model = build_efficientnet_lite_classifier("lite0", input_size=SIZE, weights="imagenet")
    backbone = keras.Model(model.input, model.get_layer("avg_pool").output)
    resized = tf.image.resize(batch, (SIZE, SIZE), method="bilinear").numpy()
    np.testing.assert_allclose(features, backbone.predict(resized, verbose=0), rtol=1e-3, atol=1e-4)


def test_the_gate_names_its_network_and_refuses_another(own_gate_dir: Path, tmp_path: Path):
    info = json.loads((own_gate_dir / GATE_FILE).read_text())
    assert info["features"]["source"] == SOURCE and info["features"]["input_size"] == SIZE
    assert SOURCE in info["feature_source"]
    gate = Gate.load(own_gate_dir, read_metadata(own_gate_dir))
    assert gate is not None and not gate.reads_classifier
    changed = tmp_path / "changed"
    shutil.copytree(own_gate_dir, changed)
    (changed / FILE).write_bytes((changed / FILE).read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        Predictor.load(changed, backend="keras", require_gate=True)
    (changed / FILE).unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        Predictor.load(changed, backend="keras", require_gate=True)


def test_served_predictions_are_gated_on_the_gates_own_features(own_gate_dir: Path):
    predictor = Predictor.load(own_gate_dir, backend="keras", require_gate=True)
    gate = predictor.gate
    assert gate is not None and gate.extractor is not None
    images = _xrays() + [np.full((64, 64), 0.5, np.float32)]
    # The gate's arrays are 1,280 wide: the classifier's 2,048 features would not even fit them.
    assert gate.feature_mean.shape == (1280,)
    results = predictor.predict(images)
    assert predictor.forward(predictor.preprocess(images)).features.shape == (4, 1280)
    assert {r.gate_version for r in results} == {gate.version}
    assert results[-1].label == INDETERMINATE and results[-1].abstain_reason == "poor_quality"
    answered = [r for r in results[:-1] if r.abstain_reason is None]
    assert answered and all(r.label in ("covid", "non-covid") for r in answered)
    # The verdicts are the gate's on the features of its own network.
    direct = gate.assess(gate.extractor(predictor.preprocess(images[:-1])),
                         np.stack([image_statistics(i) for i in images[:-1]]), [None] * 3)
    np.testing.assert_allclose([r.gate_frontal_probability for r in results[:-1]],
                               [a.frontal_probability for a in direct], rtol=1e-4)


def test_statistics_taken_at_decode_are_the_ones_finish_uses(own_gate_dir: Path):
    # The worker takes each image's statistics right after decoding it and hands them over.
    predictor = Predictor.load(own_gate_dir, backend="keras", require_gate=True)
    images = _xrays(2)
    out = predictor.forward(predictor.preprocess(images))
    early = [predictor.statistics(i) for i in images]
    late = predictor.finish(out, images, 1.0, overlays=False)
    taken = predictor.finish(out, images, 1.0, overlays=False, statistics=early)
    verdict = [(r.abstain_reason, r.gate_frontal_probability, r.gate_distance) for r in late]
    assert [(r.abstain_reason, r.gate_frontal_probability, r.gate_distance) for r in taken] == verdict
    # And they are what it reads: a flat image's statistics make the first X-ray blank to it.
    flat = predictor.statistics(np.full((64, 64), 0.5, np.float32))
    mixed = predictor.finish(out, images, 1.0, overlays=False, statistics=[flat, None])
    assert mixed[0].abstain_reason == "poor_quality"
    assert mixed[1].abstain_reason == late[1].abstain_reason


def test_a_refit_keeps_the_network_the_artifact_ships(own_gate_dir: Path, tmp_path: Path):
    from ml.training.gate import own_features, shipped_network

    model_dir = tmp_path / "tiny"
    shutil.copytree(own_gate_dir, model_dir)
    shipped = json.loads((model_dir / GATE_FILE).read_text())["features"]
    network = model_dir / shipped["file"]
    before = network.stat().st_mtime_ns

    class Sample:
        def __init__(self, path: Path):
            self.key, self.path = path.name, path

        def load(self):
            decoded = decode_image(self.path.read_bytes())
            return decoded.pixels, decoded.attributes

    block, features = own_features(model_dir, [Sample(p) for p in real_xray_paths(2)],
                                   tmp_path / "cache.npz", SIZE)
    assert block == shipped and network.stat().st_mtime_ns == before  # not exported again
    assert features.shape == (2, 1280)
    network.write_bytes(network.read_bytes()[:-1] + b"\0")  # no longer the gate's network
    assert shipped_network(model_dir) is None


def test_the_network_does_not_spin_after_its_runs(own_gate_dir: Path):
    """It runs right after the classifier's session on the same cores (docs/benchmarks.md)."""
    block = json.loads((own_gate_dir / GATE_FILE).read_text())["features"]
    extractor = GateFeatures.load(own_gate_dir, block, threads=2)
    options = extractor._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
