"""Adversarial source head for ml.train (--source-adversary): features that cannot name the source.

The collections of this data set are confounded with the label, so a plain adversary that
predicts the source would also erase the label. This one is class-conditional (as in
conditional domain-adversarial training): it sees the pooled ResNet50 features *and* the true
label, so all it can learn from the features is which collection an image came from among
those of its own class (children vs NIH adults among non-COVID images, one COVID hospital vs
another). A gradient reversal layer between the features and the head makes the backbone
unlearn exactly that, while the COVID head trains as before. Only the training model has the
head: the exported artifact is the plain classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from ml import data
from ml.model import OUTPUT_LAYER

ADVERSARY_LAYER = "source_adversary"
LABEL_INPUT = "label"
# Metrics the loop and the curves read under their single-output names.
ALIASED = ("loss", "auc", "accuracy")


class GradientReversal(keras.layers.Layer):
    """Identity on the way forward; multiplies the gradient by -scale * ramp on the way back.

    ramp is a variable (1 unless AdversaryRamp changes it), so a schedule needs no retracing.
    """

    def __init__(self, scale: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.ramp = self.add_weight(
            shape=(), initializer="ones", trainable=False, name="ramp", dtype="float32"
        )

    def call(self, x: tf.Tensor) -> tf.Tensor:
        factor = tf.cast(-self.scale * tf.convert_to_tensor(self.ramp), x.dtype)

        @tf.custom_gradient
        def reverse(t: tf.Tensor) -> tuple[tf.Tensor, object]:
            return tf.identity(t), lambda dy: factor * dy

        return reverse(x)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


def source_indices(records: Sequence[data.Record]) -> tuple[np.ndarray, list[str]]:
    """Each record's source as an index into the sorted source names."""
    names = sorted({r.source for r in records})
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[r.source] for r in records], dtype=np.int32), names


def adversarial_model(classifier: keras.Model, n_sources: int, scale: float) -> keras.Model:
    """The training model: classifier's inputs plus the label, its output plus the adversary.

    Shares every layer with classifier, so training it trains classifier.
    """
    features = classifier.get_layer("head_dropout").input  # the pooled backbone output
    label = keras.Input(shape=(1,), name=LABEL_INPUT)
    x = GradientReversal(scale, name="gradient_reversal")(features)
    # Pooled ReLU features have no fixed scale: normalised, they give the adversary an even
    # start (without this, its source accuracy stayed below what the label alone gives).
    x = keras.layers.LayerNormalization(name="adversary_norm", dtype="float32")(x)
    x = keras.layers.Concatenate(name="adversary_input")([x, label])
    x = keras.layers.Dense(256, activation="relu", name="adversary_hidden")(x)
    source = keras.layers.Dense(
        n_sources, activation="softmax", name=ADVERSARY_LAYER, dtype="float32"
    )(x)
    return keras.Model(
        {"image": classifier.input, LABEL_INPUT: label},
        {OUTPUT_LAYER: classifier.output, ADVERSARY_LAYER: source},
        name="covid_resnet50_source_adversarial",
    )


def compile_args() -> dict:
    """loss and metrics for model.compile: the classifier's as before, plus the adversary's."""
    return {
        "loss": {
            OUTPUT_LAYER: "binary_crossentropy",
            ADVERSARY_LAYER: "sparse_categorical_crossentropy",
        },
        "metrics": {
            OUTPUT_LAYER: [
                keras.metrics.AUC(name="auc"),
                keras.metrics.BinaryAccuracy(name="accuracy"),
            ],
            ADVERSARY_LAYER: [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        },
    }


class AdversaryRamp(keras.callbacks.Callback):
    """--adversary-ramp: the reversal's strength grows as in domain-adversarial training
    (Ganin et al. 2016), ramp = 2 / (1 + exp(-10 p)) - 1 with p the fraction of the epochs
    done: 0 in the first epoch, so the adversary learns before the backbone must answer it."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    @staticmethod
    def value(progress: float) -> float:
        return 2.0 / (1.0 + float(np.exp(-10.0 * progress))) - 1.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        ramp = self.value(epoch / self.epochs)
        self.model.get_layer("gradient_reversal").ramp.assign(ramp)


class AliasLogs(keras.callbacks.Callback):
    """Give the classifier's metrics their single-output names (val_auc, loss, ...).

    Must come first among the callbacks: early stopping, the plateau schedule, the history
    and the curves then read the COVID head alone; the sum with the adversary's loss is kept
    as total_loss.
    """

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        for prefix in ("", "val_"):
            if f"{prefix}loss" in logs:
                logs[f"{prefix}total_loss"] = logs[f"{prefix}loss"]
            for name in ALIASED:
                key = f"{prefix}{OUTPUT_LAYER}_{name}"
                if key in logs:
                    logs[f"{prefix}{name}"] = logs[key]
