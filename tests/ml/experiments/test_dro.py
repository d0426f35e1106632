"""Tests for ml.training.train --group-dro: the group weights, the training step, a tiny real run."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from ml.artifact import read_metadata
from ml.experiments.dro import GroupDRO, GroupDROObjective, group_indices, update_group_weights
from ml.imaging import decode_image
from ml.predictor import Predictor
from ml.training import data, pipeline, train
from ml.training.pipeline import Augmentation
from tests.conftest import CXR_DIR
from tests.ml.conftest import TINY, run_train, tiny_manifest

SOURCES = ("hannover-mhh", "covid-cxnet", "nih-chestxray8-subset", "kermany-pediatric")


def test_group_indices_are_source_and_class() -> None:
    records = [
        data.Record(Path(f"{i}.png"), label, int(label == "covid"), source, None, "PA")
        for i, (label, source) in enumerate(
            [("covid", "b"), ("normal", "b"), ("covid", "a"), ("pneumonia", "b")]
        )
    ]
    ids, names = group_indices(records)
    assert names == ["a/covid", "b/covid", "b/non-covid"]
    assert ids.tolist() == [1, 2, 0, 2]


def test_group_weights_move_towards_the_worst_group() -> None:
    q = tf.constant([0.25, 0.25, 0.25, 0.25])
    loss = tf.constant([0.1, 2.0, 0.5, 50.0])
    present = tf.constant([True, True, True, False])
    new = update_group_weights(q, loss, present, eta=0.5).numpy()
    assert new.sum() == pytest.approx(1.0)
    # exp(eta * loss) for present groups, exp(0) for the absent one (its loss is not seen).
    expected = np.exp(0.5 * np.array([0.1, 2.0, 0.5, 0.0]))
    np.testing.assert_allclose(new, expected / expected.sum(), rtol=1e-5)
    # Large losses do not overflow.
    huge = update_group_weights(q, tf.constant([1e4, 0.0, 0.0, 0.0]), present, eta=1.0)
    np.testing.assert_allclose(huge.numpy(), [1.0, 0.0, 0.0, 0.0], atol=1e-6)


def _toy_classifier() -> keras.Model:
    inputs = keras.Input((2,))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))


def _group_losses(classifier: keras.Model, x: np.ndarray, y: np.ndarray, groups: np.ndarray):
    per_image = keras.losses.binary_crossentropy(y, classifier(x)).numpy()
    return [float(per_image[groups == g].mean()) for g in (0, 1)]


def test_training_step_trains_for_the_worst_group() -> None:
    # Group 1 (8 images) has the labels of group 0 (32 images) flipped, on the same inputs.
    # The mean loss is lowest when group 0 is fitted (p = 0.2: group 1's loss 1.6, group
    # 0's 0.2); the worst group's loss is lowest at p = 0.5, where both are ln 2.
    keras.utils.set_random_seed(0)
    x = np.tile(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), (20, 1))
    y = (np.arange(40) % 2).astype(np.float32)[:, None]
    groups = np.zeros(40, np.int32)
    groups[:8] = 1
    y[:8] = 1.0 - y[:8]

    plain = _toy_classifier()
    plain.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    plain.fit(x, y, batch_size=40, epochs=60, verbose=0)
    low, high = _group_losses(plain, x, y, groups)
    assert high - low > 1.0

    model = GroupDRO(_toy_classifier(), n_groups=2, eta=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    # fit() passes the group ids where sample weights usually go.
    history = model.fit(x, y, sample_weight=groups, batch_size=40, epochs=60, verbose=0)
    majority, minority = _group_losses(model.classifier, x, y, groups)
    assert minority < 0.8 and abs(minority - majority) < 0.2
    q = model.group_weights.numpy()
    assert q.sum() == pytest.approx(1.0) and q[1] > q[0]
    logs = history.history
    assert {"loss", "robust_loss", "auc", "accuracy", "max_group_weight"} <= set(logs)
    assert logs["max_group_weight"][-1] == pytest.approx(q.max(), rel=1e-5)
    # Evaluation is the plain classifier's loss and metrics; what is exported is the toy.
    val = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(val) == {"loss", "auc", "accuracy"}
    assert model.classifier.count_params() == 3


def test_train_dataset_carries_group_ids() -> None:
    gray = np.zeros((3, 32, 32), np.float32)
    y = np.array([1, 0, 1], np.float32)
    orders = np.array([[2, 0, 1]], np.int32)
    weights = np.ones(3, np.float32)
    groups = np.array([4, 5, 6], np.int32)
    (image, label, group), *_ = list(
        pipeline.train_dataset(
            gray, y, weights, orders, 3, 0, 0, Augmentation(), GroupDROObjective(0.1), groups
        )
    )
    assert image.shape == (3, 32, 32, 3)
    assert label.numpy().ravel().tolist() == [1.0, 1.0, 0.0]
    assert group.numpy().tolist() == [6, 4, 5]


def test_group_dro_options_are_checked() -> None:
    base = ["--manifest", "m", "--out", "o"]
    config, objective = train.parse_args([*base, "--group-dro", "0.01"])
    assert isinstance(objective, GroupDROObjective) and objective.eta == 0.01
    assert objective.describe() == {"objective": "group_dro", "group_dro": 0.01}
    assert train.parse_args(base)[1].describe() == {"objective": "plain"}
    for extra in (
        ["--group-dro", "-1"],
        ["--group-dro", "0.1", "--balance-sources"],
        ["--group-dro", "0.1", "--source-adversary", "0.5"],
    ):
        with pytest.raises(SystemExit):
            train.parse_args([*base, *extra])


def test_tiny_group_dro_run_exports_a_servable_classifier(tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path / "manifest.csv", SOURCES, per_source=8)
    out = tmp_path / "model"
    proc = run_train(
        "--manifest", str(manifest), "--out", str(out), "--epochs", "1",
        "--group-dro", "0.1", *TINY,
    )  # fmt: skip
    assert "event=group_dro groups=4 eta=0.1" in proc.stdout
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("event=group_weights ")]
    shares = dict(field.split("=") for field in line.split()[1:])
    assert set(shares) == {"covid-cxnet/covid", "hannover-mhh/covid"} | {
        "kermany-pediatric/non-covid",
        "nih-chestxray8-subset/non-covid",
    }
    assert sum(float(v) for v in shares.values()) == pytest.approx(1.0, abs=1e-3)
    epoch = json.loads((out / "history.json").read_text())["epochs"][0]
    assert 0.25 <= epoch["max_group_weight"] <= 1.0
    assert epoch["robust_loss"] > 0 and 0.0 <= epoch["val_auc"] <= 1.0
    meta = read_metadata(out)
    assert meta.training_data["group_dro"] == 0.1
    xray = next((CXR_DIR / "images" / "covid").glob("hannover__*.png"))
    prediction = Predictor.load(out).predict([decode_image(xray.read_bytes()).pixels])[0]
    assert 0.0 <= prediction.probability_covid <= 1.0
