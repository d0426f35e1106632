"""ONNX export and the two inference backends: parity, CAM = Grad-CAM, automatic choice, no TF on ONNX."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ml.artifact import ArtifactError
from ml.backends import ONNX_FILE, ONNX_INFO_FILE, resolve_backend
from ml.export import export_onnx
from ml.model import init_artifact
from ml.predictor import Predictor
from tests.conftest import FIXTURES, REPO

SIZE = 64  # conv5 is 2x2 here: small, but a real map


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("export") / "model"
    init_artifact(model_dir, input_size=SIZE, seed=3)
    export_onnx(model_dir)
    return model_dir


def _images() -> list[np.ndarray]:
    from ml.imaging import decode_image

    return [decode_image(p.read_bytes()).pixels for p in sorted(FIXTURES.glob("*.png"))]


def test_export_records_its_provenance_and_parity(exported: Path):
    info = json.loads((exported / ONNX_INFO_FILE).read_text())
    meta = json.loads((exported / "metadata.json").read_text())
    assert info["weights_sha256"] == meta["weights_sha256"]
    assert info["file"] == ONNX_FILE and (exported / ONNX_FILE).stat().st_size > 1_000_000
    assert info["parity"]["probability_max_abs_diff"] <= 1e-4
    assert info["outputs"] == ["covid_probability", "cam", "features"]
    assert info["parity"]["features_max_rel_diff"] <= 1e-4


def test_both_backends_return_the_pooled_features_for_the_gate(exported: Path):
    keras_backend = Predictor.load(exported, backend="keras").backend
    onnx_backend = Predictor.load(exported, backend="onnx").backend
    batch = Predictor.load(exported, backend="onnx").preprocess([x for x in _images()])
    k, o = keras_backend.forward(batch, explain=False), onnx_backend.forward(batch, explain=False)
    assert k.features.shape == o.features.shape == (len(batch), 2048) and k.cam is None
    np.testing.assert_allclose(k.features, o.features, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(k.probability, o.probability, atol=1e-5)


def test_onnx_and_keras_agree_on_real_xrays(exported: Path):
    images = _images()
    keras_preds = Predictor.load(exported, backend="keras").predict(images, explain=True)
    onnx_preds = Predictor.load(exported, backend="onnx").predict(images, explain=True)
    for k, o in zip(keras_preds, onnx_preds, strict=True):
        assert abs(k.probability_covid - o.probability_covid) <= 1e-4
        assert k.label == o.label and k.model_sha256 == o.model_sha256
        assert (k.backend, o.backend) == ("keras", "onnx")
        assert o.heatmap_png is not None and o.heatmap_png.startswith(b"\x89PNG")


def test_forward_pass_cam_is_grad_cam(exported: Path):
    from ml.experiments.gradcam import grad_cam
    from ml.overlay import normalise_maps

    predictor = Predictor.load(exported, backend="keras")
    batch = predictor.preprocess(_images())
    _, cam = predictor.backend.run(batch, explain=True)
    expected = grad_cam(predictor.model, batch)
    np.testing.assert_allclose(normalise_maps(cam), expected, atol=1e-4)


def test_auto_prefers_a_valid_export_and_falls_back(exported: Path, tmp_path: Path):
    from ml.artifact import read_metadata

    meta = read_metadata(exported)
    assert resolve_backend("auto", exported, meta) == "onnx"
    plain = tmp_path / "plain"
    shutil.copytree(exported, plain)
    (plain / ONNX_INFO_FILE).unlink()
    assert resolve_backend("auto", plain, read_metadata(plain)) == "keras"
    with pytest.raises(ArtifactError) as err:
        Predictor.load(plain, backend="onnx")
    assert err.value.code == "no_onnx_export"
    # An export made from other weights is refused, not silently served.
    stale = tmp_path / "stale"
    shutil.copytree(exported, stale)
    info = json.loads((stale / ONNX_INFO_FILE).read_text())
    info["weights_sha256"] = "0" * 64
    (stale / ONNX_INFO_FILE).write_text(json.dumps(info))
    assert resolve_backend("auto", stale, read_metadata(stale)) == "keras"
    with pytest.raises(ArtifactError):
        Predictor.load(stale, backend="onnx")
    with pytest.raises(ValueError):
        resolve_backend("tpu", exported, meta)


def test_onnx_worker_path_never_imports_tensorflow(exported: Path):
    code = f"""
import sys
from ml.imaging import decode_image
from ml.predictor import Predictor
p = Predictor.load({str(exported)!r}, backend="auto")
img = decode_image(open({str(sorted(FIXTURES.glob('*.png'))[0])!r}, "rb").read()).pixels
[r] = p.predict([img], explain=True)
assert r.backend == "onnx" and r.heatmap_png
print("LOADED", sorted(m for m in ("tensorflow", "keras", "tf2onnx") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout


def test_keras_backend_mixed_precision_keeps_float32_outputs(exported: Path):
    """The GPU default (a mixed policy) on this CPU: bfloat16 compute, float32 answers, close to float32."""
    import keras

    from ml.artifact import load_weight_arrays, read_metadata
    from ml.backends import KerasBackend

    meta = read_metadata(exported)
    weights = load_weight_arrays(exported, meta)
    full = KerasBackend.load(meta, weights)
    mixed = KerasBackend.load(meta, weights, precision="mixed_bfloat16")
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    assert mixed.model.get_layer("conv1_conv").compute_dtype == "bfloat16"
    predictor = Predictor.load(exported, backend="keras")
    batch = predictor.preprocess(_images())
    p_full, cam_full = full.run(batch, explain=True)
    p_mixed, cam_mixed = mixed.run(batch, explain=True)
    assert p_mixed.dtype == np.float32 and cam_mixed.dtype == np.float32
    np.testing.assert_allclose(p_mixed, p_full, atol=0.05)
