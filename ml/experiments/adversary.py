"""Adversarial source head for ml.training.train (--source-adversary): features that cannot name the source.

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

from ml.model import OUTPUT_LAYER
from ml.training import data
from ml.training.log import log
from ml.training.objective import Objective

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


class SourceConfusion(keras.layers.Layer):
    """--adversary-loss confusion: a bounded objective for the backbone (Tzeng et al. 2015).

    Applies the adversary head's current weights, held fixed, to the features and adds
    scale * ramp * cross-entropy(per-class source prior, adversary output) to the loss: the
    backbone is pushed to make the adversary *unsure*, as unsure as the label alone leaves
    it, rather than confidently wrong (which an unbounded reversed loss rewards). The
    adversary itself learns on stopped features. Passes the features through unchanged.
    """

    def __init__(self, head: tuple, priors: np.ndarray, scale: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.priors = np.asarray(priors, dtype=np.float32)
        self._head = lambda: head  # shared layers: not tracked twice
        self.ramp = self.add_weight(
            shape=(), initializer="ones", trainable=False, name="ramp", dtype="float32"
        )

    def call(self, inputs: list, training: bool | None = None) -> tf.Tensor:
        features, label = inputs
        if training:
            norm, hidden, output = self._head()
            sg = tf.stop_gradient
            x = tf.cast(features, "float32")
            mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
            x = (x - mean) * tf.math.rsqrt(var + norm.epsilon) * sg(norm.gamma) + sg(norm.beta)
            x = tf.concat([x, tf.cast(label, "float32")], axis=-1)
            x = tf.nn.relu(x @ sg(hidden.kernel) + sg(hidden.bias))
            log_p = tf.nn.log_softmax(x @ sg(output.kernel) + sg(output.bias))
            target = tf.gather(tf.constant(self.priors), tf.cast(label[:, 0], tf.int32))
            confusion = -tf.reduce_mean(tf.reduce_sum(target * log_p, axis=-1))
            self.add_loss(self.scale * tf.convert_to_tensor(self.ramp) * confusion)
        return features

    def compute_output_shape(self, input_shape: list) -> tuple:
        return input_shape[0]


def source_priors(targets: np.ndarray, sources: np.ndarray, n_sources: int) -> np.ndarray:
    """(2, n_sources): the share of each source among the training images of each class."""
    counts = np.zeros((2, n_sources), dtype=np.float64)
    np.add.at(counts, (np.asarray(targets, np.intp), np.asarray(sources, np.intp)), 1.0)
    return (counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)).astype(np.float32)


def adversarial_model(
    classifier: keras.Model, n_sources: int, scale: float, priors: np.ndarray | None = None
) -> keras.Model:
    """The training model: classifier's inputs plus the label, its output plus the adversary.

    Shares every layer with classifier, so training it trains classifier. Without priors the
    backbone is trained against the adversary by gradient reversal; with them (per-class
    source priors, source_priors) by SourceConfusion.
    """
    features = classifier.get_layer("head_dropout").input  # the pooled backbone output
    label = keras.Input(shape=(1,), name=LABEL_INPUT)
    # Pooled ReLU features have no fixed scale: normalised, they give the adversary an even
    # start (without this, its source accuracy stayed below what the label alone gives).
    norm = keras.layers.LayerNormalization(name="adversary_norm", dtype="float32")
    hidden = keras.layers.Dense(256, activation="relu", name="adversary_hidden")
    output = keras.layers.Dense(
        n_sources, activation="softmax", name=ADVERSARY_LAYER, dtype="float32"
    )
    if priors is None:
        x = GradientReversal(scale, name="gradient_reversal")(features)
    else:
        # float32: no autocasting of the head's weights to a mixed policy's bfloat16 here.
        confusion = SourceConfusion(
            (norm, hidden, output), priors, scale, name="source_confusion", dtype="float32"
        )
        x = confusion([features, label])
        x = keras.layers.Lambda(keras.ops.stop_gradient, name="adversary_stop")(x)
    x = keras.layers.Concatenate(name="adversary_input")([norm(x), label])
    source = output(hidden(x))
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
        for layer in self.model.layers:
            if layer.name in ("gradient_reversal", "source_confusion"):
                layer.ramp.assign(ramp)


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


class SourceAdversary(Objective):
    """--source-adversary: the classifier trained against a class-conditional source head."""

    name = "source_adversary"
    head_layers = ("adversary_norm", "adversary_hidden", ADVERSARY_LAYER)

    def __init__(self, scale: float, loss: str = "reversal", ramp: bool = False) -> None:
        if scale <= 0 or loss not in ("reversal", "confusion"):
            raise ValueError("--source-adversary must be positive, --adversary-loss reversal|confusion")
        self.scale, self.loss, self.ramp = scale, loss, ramp

    def describe(self) -> dict[str, object]:
        """The flags, under the names earlier runs recorded them by."""
        return {
            "objective": self.name,
            "source_adversary": self.scale,
            "adversary_loss": self.loss,
            "adversary_ramp": self.ramp,
        }

    def ids(
        self, train: Sequence[data.Record], val: Sequence[data.Record]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Source ids, numbered over train and val together (kept for training_model)."""
        ids, self.names = source_indices([*train, *val])
        self.train_sources = ids[: len(train)]
        return self.train_sources, ids[len(train) :]

    def training_model(self, classifier: keras.Model, train: Sequence[data.Record]) -> keras.Model:
        """adversarial_model, with per-class source priors for the confusion loss (after ids())."""
        priors = None
        if self.loss == "confusion":
            targets = np.array([r.target for r in train], dtype=np.intp)
            priors = source_priors(targets, self.train_sources, len(self.names))
        log("adversary", sources=len(self.names), scale=self.scale, loss=self.loss)
        return adversarial_model(classifier, len(self.names), self.scale, priors)

    def compile_args(self) -> dict:
        """The classifier's loss and metrics plus the adversary's."""
        return compile_args()

    def train_batch(self, image, label, weight, ids) -> tuple:
        """Inputs, targets and weights per output; the adversary counts every image once."""
        inputs = {"image": image, LABEL_INPUT: label}
        targets = {OUTPUT_LAYER: label, ADVERSARY_LAYER: ids}
        return inputs, targets, {OUTPUT_LAYER: weight, ADVERSARY_LAYER: tf.ones_like(weight)}

    def eval_batch(self, image, label, ids) -> tuple:
        """As train_batch, without weights."""
        return self.train_batch(image, label, tf.ones_like(label), ids)[:2]

    def callbacks(self, epochs: int) -> list[keras.callbacks.Callback]:
        """AliasLogs first (val_auc is the classifier's), then the optional ramp."""
        return [AliasLogs(), *([AdversaryRamp(epochs)] if self.ramp else [])]
