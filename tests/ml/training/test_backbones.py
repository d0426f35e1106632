"""Every backbone trains (random or ImageNet init), is served, exported and explained the same way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from ml.artifact import read_metadata
from ml.export import export_onnx
from ml.imaging import decode_image
from ml.model import architecture, build_classifier, last_conv_layer
from ml.predictor import Predictor
from ml.preprocess import to_caffe
from ml.training import train
from tests.conftest import FIXTURES
from tests.ml.conftest import TINY, run_train, tiny_manifest


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny ImageNet-initialised Lite0 run: one head epoch, one fine-tuning epoch."""
    tmp = tmp_path_factory.mktemp("lite0")
    manifest = tiny_manifest(tmp / "manifest.csv")
    out = tmp / "model"
    proc = run_train(
        "--manifest", str(manifest), "--out", str(out), *TINY, "--epochs", "2",
        "--backbone", "efficientnet-lite0", "--init", "imagenet", "--warmup-epochs", "1",
    )  # fmt: skip
    return out, proc.stdout


def test_pretrained_lite0_trains_in_two_phases_into_a_servable_artifact(lite_run) -> None:
    out, stdout = lite_run
    meta = read_metadata(out)
    assert meta.architecture["name"] == "efficientnet-lite0"
    assert meta.model_version.startswith("efficientnet-lite0-cxr-")
    assert meta.training_data["backbone"] == "efficientnet-lite0"
    assert meta.training_data["init"] == "imagenet"
    assert "phase=head" in stdout and "phase=finetune" in stdout
    config = json.loads((out / "training_config.json").read_text())
    assert config["args"]["backbone"] == "efficientnet-lite0" and config["args"]["init"] == "imagenet"
    predictor = Predictor.load(out, backend="keras")
    image = decode_image((FIXTURES / "hannover__0957ce54.png").read_bytes()).pixels
    [result] = predictor.predict([image], explain=True)
    assert 0.0 <= result.probability_covid <= 1.0 and result.heatmap_png


def test_lite0_onnx_export_matches_keras(lite_run, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(lite_run[0], model_dir)
    info = export_onnx(model_dir)  # raises if ONNX and Keras disagree beyond the tolerance
    assert info["parity"]["probability_max_abs_diff"] <= 1e-4
    onnx = Predictor.load(model_dir, backend="onnx")
    image = decode_image((FIXTURES / "cxnet__681.png").read_bytes()).pixels
    keras_p = Predictor.load(model_dir, backend="keras").predict([image])[0].probability_covid
    assert onnx.predict([image])[0].probability_covid == pytest.approx(keras_p, abs=1e-4)


def test_imagenet_init_starts_from_the_converted_weights() -> None:
    arch = architecture(64, backbone="efficientnet-lite0")
    a = build_classifier(arch, weights="imagenet", seed=1)
    b = build_classifier(arch, weights="imagenet", seed=2)
    c = build_classifier(arch, seed=1)
    stem = [m.get_layer("stem_conv").get_weights()[0] for m in (a, b, c)]
    np.testing.assert_array_equal(stem[0], stem[1])  # the seed only touches the new head
    assert not np.allclose(stem[0], stem[2])


def test_lite_classifier_takes_the_same_caffe_input_as_resnet50() -> None:
    from ml.efficientnet_lite import gray_to_input

    model = build_classifier(architecture(32, backbone="efficientnet-lite0"), seed=0)
    gray = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32) * 255
    inner = keras.Model(model.input, model.get_layer("caffe_to_lite").output)
    np.testing.assert_allclose(inner(to_caffe(gray)).numpy(), gray_to_input(gray), atol=1e-5)
    assert last_conv_layer(architecture(32, backbone="efficientnet-lite2")) == "top_activation"


def test_resnet50_imagenet_init_says_what_to_do_instead(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args, **kwargs):
        raise OSError("no route to the weights' host")  # as on every machine of this project

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    manifest = tiny_manifest(tmp_path / "manifest.csv", per_source=4)
    rc = train.main(
        ["--manifest", str(manifest), "--out", str(tmp_path / "o"), *TINY, "--init", "imagenet"]
    )
    # Keras cannot fetch the file, and the error names the alternatives.
    assert rc == 2
    err = capsys.readouterr().err
    assert "--weights FILE" in err and "efficientnet-lite0" in err


def test_weights_file_and_imagenet_init_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--manifest", "m", "--out", "o", "--weights", "w.h5", "--init", "imagenet"])
    config, _ = train.parse_args(["--manifest", "m", "--out", "o", "--backbone", "efficientnet-lite2"])
    assert config.backbone == "efficientnet-lite2" and config.init == "none"
