"""Tests for ml.model: the ResNet50 builder and the `--init` CLI for an untrained dev artifact."""

from pathlib import Path

import keras
import numpy as np
import pytest

from ml.artifact import (
    WEIGHTS_FILE,
    read_metadata,
)
from ml.model import LAST_CONV_LAYER, build_resnet50, main
from ml.preprocess import preprocess_batch
from tests.ml.conftest import SIZE, random_images

# --- builder -----------------------------------------------------------------------------


def test_output_is_one_probability_per_image(model: keras.Model) -> None:
    batch = preprocess_batch(random_images(), size=SIZE)
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

