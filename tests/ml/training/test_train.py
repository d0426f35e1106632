"""Tests for ml.training.train: the input pipeline in-process, and the CLI end to end on a tiny run."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from ml.artifact import load_weight_arrays, read_metadata, sha256_file
from ml.evaluation.metrics import choose_threshold
from ml.imaging import decode_image
from ml.predictor import Predictor
from ml.preprocess import preprocess, to_caffe
from ml.training import data, pipeline, train
from ml.training.log import TrainingError
from ml.training.pipeline import Augmentation, make_split
from tests.conftest import CXR_DIR
from tests.ml.conftest import PATIENT_NAMESPACES, TINY, run_train, tiny_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_manifest(tmp_path_factory.mktemp("data") / "manifest.csv")


@pytest.fixture(scope="module")
def first_run(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    out = tmp_path_factory.mktemp("train") / "model"
    proc = run_train("--manifest", str(manifest), "--out", str(out), "--epochs", "1", *TINY)
    history = json.loads((out / "history.json").read_text())
    return out, proc.stdout, history


@pytest.fixture(scope="module")
def resumed(first_run: tuple, manifest: Path) -> tuple[Path, str]:
    out = first_run[0]
    proc = run_train(
        "--manifest", str(manifest), "--out", str(out), "--epochs", "2", "--resume", *TINY
    )
    return out, proc.stdout


@pytest.fixture(scope="module")
def unbroken(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "unbroken"
    run_train("--manifest", str(manifest), "--out", str(out), "--epochs", "2", *TINY)
    return out


# --- the CLI end to end ------------------------------------------------------------------------


def test_tiny_run_writes_a_servable_trained_artifact(first_run: tuple, manifest: Path) -> None:
    out, stdout, history = first_run
    predictor = Predictor.load(out)
    meta = predictor.metadata
    assert meta.trained is True and 0.0 <= meta.threshold <= 1.0
    assert (
        meta.model_version.startswith("resnet50-cxr-")
        and meta.weights_sha256[:8] in meta.model_version
    )
    assert meta.input_size == 32 and meta.preprocess_version == "2"
    assert meta.training_data["split_sha256"] == sha256_file(out / "split.csv")
    assert meta.training_data["splits"]["train"]["images"] == 16
    assert set(meta.metrics) >= {"val_auroc", "val_sensitivity", "val_specificity"}
    assert len(history["epochs"]) == 1 and history["epochs"][0]["epoch"] == 1
    assert {"loss", "val_loss", "val_auc", "accuracy", "images_per_s"} <= set(history["epochs"][0])
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not (out / "checkpoint" / "export").exists()
    assert "event=done" in stdout and not any(ns in stdout for ns in PATIENT_NAMESPACES)


def test_threshold_matches_what_is_served(first_run: tuple, manifest: Path) -> None:
    out = first_run[0]
    predictor = Predictor.load(out)
    split = data.read_split(out / "split.csv", data.load_manifest(manifest))
    val = split["val"]
    scores = [
        p.probability_covid
        for p in predictor.predict([decode_image(r.path.read_bytes()).pixels for r in val])
    ]
    y = [r.target for r in val]
    assert predictor.metadata.threshold == choose_threshold(y, scores, 0.90)


def test_split_file_is_patient_disjoint(first_run: tuple, manifest: Path) -> None:
    split = data.read_split(first_run[0] / "split.csv", data.load_manifest(manifest))
    data.check_patient_disjoint(split)
    assert [len(split[s]) for s in ("train", "val", "test")] == [16, 4, 4]
    for name in ("val", "test"):
        assert sorted(r.target for r in split[name]) == [0, 0, 1, 1]


def test_config_records_arguments_and_versions(first_run: tuple) -> None:
    config = json.loads((first_run[0] / "training_config.json").read_text())
    assert config["args"]["input_size"] == 32 and config["seed"] == 0
    policy = "mixed_bfloat16" if train.cpu_has_bf16() else "float32"  # --mixed-precision auto
    assert config["resolved"] == {"batch_size": 8, "dtype_policy": policy, "verbose": 2}
    assert config["versions"]["tensorflow"] == tf.__version__ and config["versions"]["keras"]


def test_resume_continues_the_history(resumed: tuple) -> None:
    out, stdout = resumed
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert "first_epoch=2" in stdout and "resume=True" in stdout
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 2 and state["best_epoch"] in (1, 2)
    assert read_metadata(out).metrics["epochs_run"] == 2
    config = json.loads((out / "training_config.json").read_text())
    assert config["previous_runs"][0]["args"]["epochs"] == 1


def test_resume_gives_the_model_an_unbroken_run_gives(resumed: tuple, unbroken: Path) -> None:
    # Same order, augmentation, Adam moments and dropout state after the restart.
    out = resumed[0]
    a, b = (json.loads((d / "history.json").read_text())["epochs"] for d in (out, unbroken))
    assert [e["loss"] for e in a] == pytest.approx([e["loss"] for e in b], rel=1e-5)
    weights = [load_weight_arrays(d, read_metadata(d)) for d in (out, unbroken)]
    for x, y in zip(*weights, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-3)


def test_out_dir_is_not_clobbered_and_resume_must_match(
    resumed: tuple, manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    out = resumed[0]
    base = ["--manifest", str(manifest), "--out", str(out)]
    assert train.main(base) == 2
    assert "--resume or --force" in capsys.readouterr().err
    assert train.main([*base, "--resume", "--input-size", "64"]) == 2
    assert "input_size" in capsys.readouterr().err
    assert (
        train.main(["--manifest", str(manifest), "--out", str(out.parent / "new"), "--resume"]) == 2
    )
    # A bad option never costs the checkpoint, even with --force.
    assert train.main([*base, "--force", "--exclude-source", "nowhere"]) == 2
    assert "no source named" in capsys.readouterr().err
    assert (out / "checkpoint" / "last.weights.h5").is_file()


def test_auto_precision_uses_bf16_only_where_the_cpu_has_it() -> None:
    assert train.cpu_has_bf16("flags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_tile\n")
    assert train.cpu_has_bf16("flags : sse amx_bf16 amx_tile\nbugs : spectre\n")
    # AVX2-only EPYC: bf16 would be emulated, several times slower than float32.
    assert not train.cpu_has_bf16("flags\t\t: fpu avx avx2 fma\nbugs\t\t: sysret_ss_attrs\n")
    assert not train.cpu_has_bf16("model name : avx512_bf16 in a name is not a flag\n")


def test_help_explains_the_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "--resume",
        "--exclude-source",
        "224",
        "--mixed-precision",
        "imagenet",
        "examples",
    ):
        assert needle in text


# --- the input pipeline ------------------------------------------------------------------------


def _gray_batch() -> np.ndarray:
    paths = [p for p in sorted((CXR_DIR / "images" / "covid").glob("hannover__*.png"))[:3]]
    return data.load_gray_images([data.Record(p, "covid", 1, "s", None, "PA") for p in paths], 64)


def test_tf_to_caffe_equals_serving_preprocessing() -> None:
    gray = _gray_batch()
    np.testing.assert_array_equal(
        pipeline.to_caffe(tf.constant(gray[..., None])).numpy(), to_caffe(gray)
    )


def test_augment_is_small_seeded_and_in_range() -> None:
    gray = tf.constant(_gray_batch()[..., None])
    a = pipeline.augment(gray, tf.constant([0, 5], tf.int64)).numpy()
    assert a.shape == gray.shape and a.min() >= 0.0 and a.max() <= 255.0
    np.testing.assert_array_equal(a, pipeline.augment(gray, tf.constant([0, 5], tf.int64)).numpy())
    b = pipeline.augment(gray, tf.constant([0, 6], tf.int64)).numpy()
    assert not np.array_equal(a, b)
    # Mild: still close to the original image, far closer than to another X-ray.
    original = gray.numpy()
    assert np.abs(a - original).mean() < 0.5 * np.abs(original[0] - original[1]).mean() + 25


def test_strong_augmentation_also_varies_exposure_sharpness_and_noise() -> None:
    gray = tf.constant(_gray_batch()[..., None])
    seed = tf.constant([0, 5], tf.int64)
    strong = Augmentation("strong")
    a = pipeline.augment(gray, seed, strong).numpy()
    assert a.shape == gray.shape and a.min() >= 0.0 and a.max() <= 255.0
    np.testing.assert_array_equal(a, pipeline.augment(gray, seed, strong).numpy())
    mild = pipeline.augment(gray, seed).numpy()
    original = gray.numpy()
    # Further from the original than mild, still far closer than another X-ray is.
    assert np.abs(a - original).mean() > np.abs(mild - original).mean()
    assert np.abs(a - original).mean() < np.abs(original[0] - original[1]).mean() + 40

    # Noise and sharpening change neighbouring-pixel differences, which mild leaves alone.
    def roughness(x: np.ndarray) -> np.ndarray:
        return np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))

    assert not np.allclose(roughness(a), roughness(mild), rtol=0.05)


def test_train_dataset_follows_the_epoch_orders() -> None:
    gray = _gray_batch()
    y = np.array([1, 0, 1], np.float32)
    orders = np.stack([data.epoch_order(3, e, seed=0) for e in range(2)])
    batches = list(
        pipeline.train_dataset(gray, y, np.ones(3, np.float32), orders, 2, 0, 0, Augmentation())
    )
    assert [len(b[1]) for b in batches] == [2, 1, 2, 1]
    labels = np.concatenate([b[1].numpy().ravel() for b in batches])
    np.testing.assert_array_equal(labels, y[orders.ravel()])
    x = batches[0][0].numpy()
    assert x.shape == (2, 64, 64, 3) and x.dtype == np.float32
    # Channels stay equal: grey replicated, then the per-channel mean taken off.
    np.testing.assert_allclose(x[..., 0] + 103.939, x[..., 2] + 123.68, atol=1e-3)


def test_eval_dataset_is_unaugmented() -> None:
    gray = _gray_batch()
    (x, y), *_ = list(pipeline.eval_dataset(gray, np.array([1, 0, 1], np.float32), 8))
    record_pixels = decode_image(
        sorted((CXR_DIR / "images" / "covid").glob("hannover__*.png"))[0].read_bytes()
    )
    np.testing.assert_array_equal(x.numpy()[0], preprocess(record_pixels.pixels, 64))
    assert y.numpy().tolist() == [[1.0], [0.0], [1.0]]


def test_patch_augmentation_shows_a_magnified_window_inside_the_image() -> None:
    # A ramp from 0 to 255 across the columns: a window of 50-100% of the width, stretched to
    # the full width, shows the ramp at 0.5-1x its slope per pixel, and never the reflected
    # edge (the window stays inside the image).
    ramp = np.tile(np.linspace(0.0, 255.0, 64, dtype=np.float32), (64, 1))
    gray = tf.constant(np.stack([ramp] * 16)[..., None])
    patch = Augmentation("patch")
    out = pipeline.augment(gray, tf.constant([0, 5], tf.int64), patch).numpy()[..., 0]
    np.testing.assert_array_equal(
        out, pipeline.augment(gray, tf.constant([0, 5], tf.int64), patch).numpy()[..., 0]
    )
    rows = out[:, 24:40, 8:56]  # central rows and columns: rotation (<= 7 deg) barely matters
    slope = np.median(np.diff(rows, axis=2), axis=(1, 2)) / (255.0 / 63)
    # Brightness/contrast (mild) scale the slope by 0.9-1.1 on top of the magnification.
    assert slope.min() > 0.4 and slope.max() < 1.15 and np.median(slope) < 0.85
    # Monotonic along each row of the centre: no reflection at an edge came into view.
    assert (np.diff(rows, axis=2) > -3.0).all()


def test_exclude_label_drops_it_from_train_and_val_only(tmp_path: Path) -> None:
    manifest = tiny_manifest(
        tmp_path / "manifest.csv", ("hannover-mhh", "kermany-pediatric"), per_source=40
    )
    # The first Kermany rows are all normal: relabel every other one (only the strings matter).
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    kermany = [row for row in rows if row["source"] == "kermany-pediatric"]
    for row in kermany[::2]:
        row["label"] = "pneumonia"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    base = ["--manifest", str(manifest), "--out", str(tmp_path / "o")]
    whole = make_split(train.parse_args(base)[0], tmp_path)
    labels = {name: {r.label for r in rs} for name, rs in whole.items()}
    assert "normal" in labels["train"] and "pneumonia" in labels["train"]  # not vacuous
    split = make_split(train.parse_args([*base, "--exclude-label", "Normal"])[0], tmp_path)
    for name in ("train", "val"):
        assert "normal" not in {r.label for r in split[name]}
        assert split[name] == [r for r in whole[name] if r.label != "normal"]
    assert split["test"] == whole["test"]
    with pytest.raises(TrainingError, match="no label named"):
        make_split(train.parse_args([*base, "--exclude-label", "fracture"])[0], tmp_path)
    with pytest.raises(TrainingError, match="needs COVID and non-COVID"):
        make_split(train.parse_args([*base, "--exclude-label", "covid"])[0], tmp_path)
