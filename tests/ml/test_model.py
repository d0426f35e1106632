"""Tests for the model builder, the artifact format, the Predictor and the `--init` CLI."""

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from ml.artifact import (
    FORMAT_VERSION,
    METADATA_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    ModelMetadata,
    load_weight_arrays,
    read_metadata,
    sha256_file,
    write_artifact,
)
from ml.model import LAST_CONV_LAYER, build_resnet50, main
from ml.predictor import Prediction, Predictor
from ml.preprocess import PREPROCESS_VERSION, preprocess_batch

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZE = (
    32  # ResNet50's minimum input: the weight count does not depend on it, build time barely does
)
ARCH = {"name": "resnet50", "input_size": SIZE, "dropout": 0.3}


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.random(shape, dtype=np.float32) for shape in [(40, 50), (120, 64), (32, 32)]]


def _small_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)]


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return build_resnet50(input_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the real CLI once; its artifact is shared by the Predictor tests."""
    model_dir = tmp_path_factory.mktemp("dev-model")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml.model",
            "--init",
            str(model_dir),
            "--input-size",
            str(SIZE),
            "--force",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return model_dir, proc.stdout


@pytest.fixture(scope="module")
def predictor(cli_run: tuple[Path, str]) -> Predictor:
    return Predictor.load(cli_run[0])


@pytest.fixture
def small_artifact(tmp_path: Path) -> tuple[Path, ModelMetadata]:
    meta = write_artifact(
        tmp_path / "m",
        _small_weights(),
        model_version="test-{sha8}",
        architecture=ARCH,
        trained=True,
    )
    return tmp_path / "m", meta


def _edit_metadata(model_dir: Path, **changes: object) -> None:
    path = model_dir / METADATA_FILE
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


# --- builder -----------------------------------------------------------------------------


def test_output_is_one_probability_per_image(model: keras.Model) -> None:
    batch = preprocess_batch(_images(), size=SIZE)
    out = np.asarray(model(batch, training=False))
    assert out.shape == (3, 1)
    assert ((out >= 0.0) & (out <= 1.0)).all()


def test_head_has_dropout_and_named_layers(model: keras.Model) -> None:
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert [d.rate for d in dropouts] == [0.3]
    assert model.get_layer("covid_probability").units == 1
    # Flat graph: the last conv block is a layer of the classifier itself, not of a nested Model.
    assert model.get_layer(LAST_CONV_LAYER).output.shape[1:3] == (1, 1)


def test_seed_makes_weights_reproducible(model: keras.Model) -> None:
    again = build_resnet50(input_size=SIZE, seed=0)
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_local_backbone_weights_file_is_loaded(tmp_path: Path, model: keras.Model) -> None:
    keras.utils.set_random_seed(123)
    backbone = keras.applications.ResNet50(
        include_top=False, pooling="avg", weights=None, input_shape=(SIZE, SIZE, 3)
    )
    path = tmp_path / "resnet50_notop.weights.h5"
    backbone.save_weights(path)

    loaded = build_resnet50(input_size=SIZE, weights=str(path))
    layers_with_weights = [layer for layer in backbone.layers if layer.weights]
    assert len(layers_with_weights) > 100
    for layer in layers_with_weights:
        for saved, got in zip(
            layer.get_weights(), loaded.get_layer(layer.name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(saved, got)
    # And not by coincidence: a differently seeded build has other weights.
    assert not np.array_equal(
        model.get_layer("conv1_conv").get_weights()[0],
        loaded.get_layer("conv1_conv").get_weights()[0],
    )


def test_legacy_h5_backbone_file_is_loaded(tmp_path: Path) -> None:
    """The offline route for ImageNet: Keras' own *_notop.h5 download is a legacy HDF5 file."""
    h5py = pytest.importorskip("h5py")
    # Private Keras API, test only: Keras 3 can no longer write this format publicly.
    legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")
    keras.utils.set_random_seed(5)
    backbone = keras.applications.ResNet50(
        include_top=False, pooling="avg", weights=None, input_shape=(SIZE, SIZE, 3)
    )
    path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(path, "w") as fh:
        legacy.save_weights_to_hdf5_group(fh, backbone)

    loaded = build_resnet50(input_size=SIZE, weights=str(path))
    for name in ("conv1_conv", "conv5_block3_3_bn"):
        for saved, got in zip(
            backbone.get_layer(name).get_weights(),
            loaded.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(saved, got)


def test_missing_weights_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        build_resnet50(input_size=SIZE, weights=str(tmp_path / "nope.weights.h5"))


# --- artifact ----------------------------------------------------------------------------


def test_write_then_read_round_trip(small_artifact: tuple[Path, ModelMetadata]) -> None:
    model_dir, meta = small_artifact
    assert read_metadata(model_dir) == meta
    assert meta.format_version == FORMAT_VERSION and meta.preprocess_version == PREPROCESS_VERSION
    assert meta.class_names == ["non-covid", "covid"] and meta.input_size == SIZE
    assert meta.model_version == f"test-{meta.weights_sha256[:8]}"
    assert meta.weights_sha256 == sha256_file(model_dir / WEIGHTS_FILE)
    assert meta.created_at.endswith("+00:00") and "Not for diagnosis" in meta.notice
    json.dumps(meta.to_json())  # serialisable as is
    # Readable by a worker running as another user (e.g. a container mounting models/).
    for name in (WEIGHTS_FILE, "metadata.json"):
        assert (model_dir / name).stat().st_mode & 0o044 == 0o044


def test_weights_float16_on_disk_float32_on_load(
    small_artifact: tuple[Path, ModelMetadata],
) -> None:
    model_dir, meta = small_artifact
    with np.load(model_dir / WEIGHTS_FILE) as npz:
        assert npz.files == ["w0000", "w0001"]
        assert {npz[k].dtype for k in npz.files} == {np.dtype(np.float16)}
    arrays = load_weight_arrays(model_dir, meta)
    assert [a.dtype for a in arrays] == [np.float32, np.float32]
    for got, want in zip(arrays, _small_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_float32_weights_and_integer_arrays_are_exact(tmp_path: Path) -> None:
    weights = [*_small_weights(), np.arange(5, dtype=np.int64)]
    meta = write_artifact(
        tmp_path,
        weights,
        model_version="v",
        architecture=ARCH,
        trained=True,
        weights_dtype="float32",
    )
    for got, want in zip(load_weight_arrays(tmp_path, meta), weights, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_same_weights_give_same_bytes(tmp_path: Path) -> None:
    a = write_artifact(
        tmp_path / "a", _small_weights(), model_version="v", architecture=ARCH, trained=True
    )
    b = write_artifact(
        tmp_path / "b", _small_weights(), model_version="v", architecture=ARCH, trained=True
    )
    assert a.weights_sha256 == b.weights_sha256


def test_float16_overflow_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float32"):
        write_artifact(
            tmp_path,
            [np.array([1e6], np.float32)],
            model_version="v",
            architecture=ARCH,
            trained=True,
        )
    assert not (tmp_path / METADATA_FILE).exists()


def test_tampered_weights_are_invalid(small_artifact: tuple[Path, ModelMetadata]) -> None:
    model_dir, meta = small_artifact
    np.savez_compressed(
        model_dir / WEIGHTS_FILE, w0000=np.zeros((3, 4), np.float16), w0001=np.zeros(4, np.float16)
    )
    with pytest.raises(ArtifactError) as exc:
        load_weight_arrays(model_dir, meta)
    assert exc.value.code == "invalid_model" and "sha256" in exc.value.message


def test_missing_weights_file_is_invalid(small_artifact: tuple[Path, ModelMetadata]) -> None:
    model_dir, meta = small_artifact
    (model_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError) as exc:
        load_weight_arrays(model_dir, meta)
    assert exc.value.code == "invalid_model"


def test_missing_dir_or_metadata_is_no_model(tmp_path: Path) -> None:
    for model_dir in (tmp_path / "absent", tmp_path):
        with pytest.raises(ArtifactError) as exc:
            read_metadata(model_dir)
        assert exc.value.code == "no_model"


@pytest.mark.parametrize(
    "changes",
    [
        {"trained": "yes"},
        {"threshold": True},
        {"threshold": 1.5},
        {"input_size": "32"},
        {"preprocess_version": "0"},
        {"preprocess_version": "99"},
        {"format_version": FORMAT_VERSION + 1},
        {"weights_file": "../elsewhere.npz"},
        {"weights_dtype": "int8"},
        {"class_names": ["covid", "non-covid"]},
        {"architecture": {"name": "vgg16", "input_size": SIZE}},
        {"architecture": {"name": "resnet50", "input_size": SIZE, "dropout": "0.3"}},
    ],
)
def test_bad_metadata_is_invalid(small_artifact: tuple[Path, ModelMetadata], changes: dict) -> None:
    model_dir, _ = small_artifact
    _edit_metadata(model_dir, **changes)
    with pytest.raises(ArtifactError) as exc:
        read_metadata(model_dir)
    assert exc.value.code == "invalid_model"


def test_missing_field_and_bad_json_are_invalid(small_artifact: tuple[Path, ModelMetadata]) -> None:
    model_dir, _ = small_artifact
    raw = json.loads((model_dir / METADATA_FILE).read_text())
    del raw["weights_sha256"]
    (model_dir / METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="weights_sha256") as exc:
        read_metadata(model_dir)
    assert exc.value.code == "invalid_model"

    (model_dir / METADATA_FILE).write_text("{not json")
    with pytest.raises(ArtifactError) as exc:
        read_metadata(model_dir)
    assert exc.value.code == "invalid_model"


# --- CLI and Predictor -------------------------------------------------------------------


def test_cli_init_writes_an_untrained_artifact(cli_run: tuple[Path, str]) -> None:
    model_dir, stdout = cli_run
    meta = read_metadata(model_dir)
    assert meta.trained is False and "untrained" in meta.model_version
    assert meta.input_size == SIZE and meta.threshold == 0.5
    assert meta.training_data["note"] == "untrained development model, random weights"
    assert "UNTRAINED" in stdout and meta.model_version in stdout and str(model_dir) in stdout
    # ResNet50's 23.6M parameters in float16 keep the artifact small.
    assert (model_dir / WEIGHTS_FILE).stat().st_size < 50 * 1024 * 1024


def test_cli_refuses_to_overwrite_without_force(cli_run: tuple[Path, str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--init", str(cli_run[0]), "--input-size", str(SIZE)])
    assert exc.value.code == 2


def test_predict_matches_keras_model(predictor: Predictor, cli_run: tuple[Path, str]) -> None:
    images = _images()
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
    for p in predictor.predict(_images()):
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
    _edit_metadata(model_dir, preprocess_version="1")
    v1 = Predictor.load(model_dir)
    images = _images()
    predictions = v1.predict(images)
    assert {p.preprocess_version for p in predictions} == {"1"}

    reference = build_resnet50(input_size=SIZE)
    reference.set_weights(load_weight_arrays(model_dir, v1.metadata))
    batch = preprocess_batch(images, size=SIZE, version="1")
    expected = np.asarray(reference(batch, training=False)).reshape(-1)
    np.testing.assert_allclose([p.probability_covid for p in predictions], expected, atol=1e-5)


def test_label_follows_threshold(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _images()
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
    images = _images()
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
