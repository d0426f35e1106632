"""Tests for ml.artifact: the model directory format, validated before anything is served."""


import json
from pathlib import Path

import numpy as np
import pytest

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
from ml.preprocess import PREPROCESS_VERSION
from tests.ml.conftest import ARCH, SIZE, edit_metadata, small_weights

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
    for got, want in zip(arrays, small_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_float32_weights_and_integer_arrays_are_exact(tmp_path: Path) -> None:
    weights = [*small_weights(), np.arange(5, dtype=np.int64)]
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
        tmp_path / "a", small_weights(), model_version="v", architecture=ARCH, trained=True
    )
    b = write_artifact(
        tmp_path / "b", small_weights(), model_version="v", architecture=ARCH, trained=True
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
    edit_metadata(model_dir, **changes)
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


