"""Tests for ml.training.train --source-adversary: the reversal layer, the data it sees, a tiny real run."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from ml.artifact import load_weight_arrays, read_metadata
from ml.experiments.adversary import (
    ADVERSARY_LAYER,
    AdversaryRamp,
    AliasLogs,
    GradientReversal,
    SourceAdversary,
    adversarial_model,
    source_indices,
    source_priors,
)
from ml.imaging import decode_image
from ml.model import OUTPUT_LAYER, build_resnet50
from ml.predictor import Predictor
from ml.training import data, pipeline, train
from ml.training.pipeline import Augmentation
from tests.conftest import CXR_DIR
from tests.ml.conftest import TINY, run_train, tiny_manifest

# Two collections per class, so that the adversary has something to tell apart in each.
SOURCES = ("hannover-mhh", "covid-cxnet", "nih-chestxray8-subset", "kermany-pediatric")


def test_gradient_reversal_is_identity_forward_and_negates_backward() -> None:
    layer = GradientReversal(0.25)
    x = tf.constant([[1.0, -2.0, 3.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.constant([[1.0, 2.0, 4.0]]))
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), [[-0.25, -0.5, -1.0]])
    assert GradientReversal.from_config(layer.get_config()).scale == 0.25


def test_ramp_scales_the_reversed_gradient_on_the_domain_adversarial_schedule() -> None:
    layer = GradientReversal(2.0)
    ramp = AdversaryRamp(epochs=10)
    assert ramp.value(0.0) == 0.0 and 0.99 < ramp.value(1.0) < 1.0
    assert ramp.value(0.1) == pytest.approx(2 / (1 + np.exp(-1.0)) - 1)
    x = tf.constant([[1.0, -2.0]])
    for value in (0.0, 0.5):
        layer.ramp.assign(value)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x))
        np.testing.assert_allclose(tape.gradient(loss, x).numpy(), [[-2.0 * value] * 2])
    with pytest.raises(SystemExit):
        train.parse_args(["--manifest", "m", "--out", "o", "--adversary-ramp"])


def test_adversary_sees_the_label_and_pushes_the_backbone_away() -> None:
    classifier = build_resnet50(32, seed=0)
    model = adversarial_model(classifier, n_sources=3, scale=1.0)
    assert set(model.output) == {OUTPUT_LAYER, ADVERSARY_LAYER}
    # Shared layers: the classifier's weights are the training model's.
    assert {id(v) for v in classifier.weights} <= {id(v) for v in model.weights}
    image = tf.random.stateless_uniform((4, 32, 32, 3), seed=(1, 2), maxval=100.0)
    inputs = {"image": image, "label": tf.constant([[1.0], [0.0], [1.0], [0.0]])}
    source = tf.constant([0, 1, 2, 1])
    dense = classifier.get_layer(OUTPUT_LAYER).kernel
    last_conv = classifier.get_layer("conv5_block3_3_conv").kernel
    adversary = model.get_layer(ADVERSARY_LAYER).kernel
    scce = keras.losses.SparseCategoricalCrossentropy()

    def grads(scale: float) -> list[np.ndarray]:
        model.get_layer("gradient_reversal").scale = scale
        with tf.GradientTape() as tape:
            loss = scce(source, model(inputs, training=False)[ADVERSARY_LAYER])
        found = tape.gradient(loss, [last_conv, adversary, dense])
        return [None if g is None else g.numpy() for g in found]

    flipped, plain = grads(1.0), grads(-1.0)
    # The backbone gets the adversary's gradient reversed; the adversary itself does not,
    # and the COVID head is not on the adversary's path at all.
    assert np.abs(plain[0]).max() > 0
    np.testing.assert_allclose(flipped[0], -plain[0], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(flipped[1], plain[1], rtol=1e-5)
    assert flipped[2] is None or not np.any(flipped[2])
    # The label is one of the adversary's inputs (last row of its first kernel).
    assert model.get_layer("adversary_hidden").kernel.shape[0] == 2048 + 1


def test_confusion_pushes_the_backbone_towards_the_prior_and_leaves_the_adversary_alone() -> None:
    priors = source_priors(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 2, 2, 1]), 3)
    np.testing.assert_allclose(priors, [[0.5, 0.5, 0.0], [0.0, 1 / 3, 2 / 3]], rtol=1e-6)
    classifier = build_resnet50(32, seed=0)
    model = adversarial_model(classifier, n_sources=3, scale=1.0, priors=priors)
    image = tf.random.stateless_uniform((4, 32, 32, 3), seed=(1, 2), maxval=100.0)
    inputs = {"image": image, "label": tf.constant([[1.0], [0.0], [1.0], [0.0]])}
    last_conv = classifier.get_layer("conv5_block3_3_conv").kernel
    adversary = model.get_layer(ADVERSARY_LAYER).kernel
    with tf.GradientTape(persistent=True) as tape:
        out = model(inputs, training=True)
        own = keras.losses.SparseCategoricalCrossentropy()(
            tf.constant([0, 1, 2, 1]), out[ADVERSARY_LAYER]
        )
        (confusion,) = model.losses
    # The adversary learns from its own loss on stopped features; the backbone only from
    # the confusion term, which never moves the adversary's weights.
    assert tape.gradient(own, last_conv) is None
    assert np.abs(tape.gradient(own, adversary).numpy()).max() > 0
    assert np.abs(tape.gradient(confusion, last_conv).numpy()).max() > 0
    assert tape.gradient(confusion, adversary) is None
    # Bounded below by the prior's entropy (reached when the adversary is as unsure as the
    # label alone leaves it); no confusion term at inference.
    entropy = -np.mean([np.sum(p[p > 0] * np.log(p[p > 0])) for p in priors[[1, 0, 1, 0]]])
    assert float(confusion) >= entropy - 1e-5
    model(inputs, training=False)
    assert not model.losses
    with pytest.raises(SystemExit):
        train.parse_args(["--manifest", "m", "--out", "o", "--adversary-loss", "confusion"])


def test_source_indices_and_alias_logs() -> None:
    records = [
        data.Record(Path(f"{i}.png"), "covid", 1, source, None, "PA")
        for i, source in enumerate(["b", "a", "b", "c"])
    ]
    ids, names = source_indices(records)
    assert names == ["a", "b", "c"] and ids.tolist() == [1, 0, 1, 2]
    logs = {
        "loss": 3.0,
        f"{OUTPUT_LAYER}_loss": 1.0,
        f"{OUTPUT_LAYER}_auc": 0.7,
        f"val_{OUTPUT_LAYER}_auc": 0.6,
        "val_loss": 4.0,
        f"val_{OUTPUT_LAYER}_loss": 2.0,
    }
    AliasLogs().on_epoch_end(0, logs)
    assert logs["loss"] == 1.0 and logs["total_loss"] == 3.0 and logs["auc"] == 0.7
    assert logs["val_auc"] == 0.6 and logs["val_loss"] == 2.0 and logs["val_total_loss"] == 4.0


def test_train_dataset_carries_sources_for_the_adversary() -> None:
    gray = np.zeros((3, 32, 32), np.float32)
    y = np.array([1, 0, 1], np.float32)
    orders = np.array([[2, 0, 1]], np.int32)
    weights = np.array([2.0, 0.5, 2.0], np.float32)
    sources = np.array([5, 6, 7], np.int32)
    (inputs, targets, sw), *_ = list(
        pipeline.train_dataset(
            gray, y, weights, orders, 3, 0, 0, Augmentation(), SourceAdversary(1.0), sources
        )
    )
    assert inputs["image"].shape == (3, 32, 32, 3)
    assert inputs["label"].numpy().ravel().tolist() == [1.0, 1.0, 0.0]
    assert targets[ADVERSARY_LAYER].numpy().tolist() == [7, 5, 6]
    assert sw[OUTPUT_LAYER].numpy().tolist() == [2.0, 2.0, 0.5]
    assert sw[ADVERSARY_LAYER].numpy().tolist() == [1.0, 1.0, 1.0]
    (val_inputs, val_targets), *_ = list(pipeline.eval_dataset(gray, y, 8, SourceAdversary(1.0), sources))
    assert val_targets[ADVERSARY_LAYER].numpy().tolist() == [5, 6, 7]
    assert val_inputs["label"].numpy().ravel().tolist() == [1.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def adversarial_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("adversary")
    manifest = tiny_manifest(root / "manifest.csv", SOURCES, per_source=8)
    out = root / "model"
    proc = run_train(
        "--manifest", str(manifest), "--out", str(out), "--epochs", "1",
        "--source-adversary", "0.5", "--adversary-loss", "confusion", "--adversary-ramp",
        *TINY,
    )  # fmt: skip
    return out, proc.stdout


def test_tiny_adversarial_run_exports_the_plain_classifier(adversarial_run: tuple) -> None:
    out, stdout = adversarial_run
    assert "event=adversary sources=4 scale=0.5 loss=confusion" in stdout
    epoch = json.loads((out / "history.json").read_text())["epochs"][0]
    assert epoch["loss"] == epoch[f"{OUTPUT_LAYER}_loss"] < epoch["total_loss"]
    assert epoch["val_auc"] == epoch[f"val_{OUTPUT_LAYER}_auc"]
    assert 0.0 <= epoch[f"val_{ADVERSARY_LAYER}_accuracy"] <= 1.0
    meta = read_metadata(out)
    assert meta.training_data["source_adversary"] == 0.5
    assert meta.training_data["adversary_ramp"] is True
    assert meta.training_data["adversary_loss"] == "confusion"
    # The artifact holds the classifier alone, and the service loads it.
    plain = build_resnet50(32)
    shapes = [a.shape for a in load_weight_arrays(out, meta)]
    assert shapes == [tuple(w.shape) for w in plain.get_weights()]
    xray = next((CXR_DIR / "images" / "covid").glob("hannover__*.png"))
    prediction = Predictor.load(out).predict([decode_image(xray.read_bytes()).pixels])[0]
    assert 0.0 <= prediction.probability_covid <= 1.0


def test_resume_must_keep_the_adversary(
    adversarial_run: tuple, capsys: pytest.CaptureFixture
) -> None:
    out = adversarial_run[0]
    manifest = out.parent / "manifest.csv"
    base = ["--manifest", str(manifest), "--out", str(out), "--resume", *TINY]
    assert train.main([*base, "--source-adversary", "1.0"]) == 2
    assert "source_adversary" in capsys.readouterr().err
