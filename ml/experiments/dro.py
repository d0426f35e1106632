"""Group DRO for ml.training.train (--group-dro ETA): train for the worst (source, class) group.

The collections of this data set are confounded with the label, so the average training loss
can be low while one collection is learnt by its shortcut. Group distributionally robust
optimisation (Sagawa et al. 2020, the online algorithm) weights each group's loss by q, a
distribution over the groups that moves towards the groups that are currently worst: after
each batch, q_g <- q_g * exp(eta * loss_g), renormalised, where loss_g is the batch's mean
loss on group g (a group absent from the batch is not pushed up), and the model descends
sum_g q_g loss_g. It replaces class weighting: every (source, class) group counts, whatever
its size. Only the training model has q; the classifier it wraps is what gets exported.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from ml.training import data
from ml.training.log import log
from ml.training.objective import Objective


def group_indices(records: Sequence[data.Record]) -> tuple[np.ndarray, list[str]]:
    """Each record's (source, class) group as an index into the sorted group names."""
    keys = [f"{r.source}/{'covid' if r.target else 'non-covid'}" for r in records]
    names = sorted(set(keys))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[k] for k in keys], dtype=np.int32), names


def update_group_weights(
    q: tf.Tensor, group_loss: tf.Tensor, present: tf.Tensor, eta: float
) -> tf.Tensor:
    """One exponentiated-gradient step on the group weights (groups absent from the batch
    count as loss 0, as in the reference implementation), renormalised."""
    step = tf.where(present, eta * group_loss, tf.zeros_like(group_loss))
    q = q * tf.exp(step - tf.reduce_max(step))  # shifted for overflow safety; normalised below
    return q / tf.reduce_sum(q)


class GroupDRO(keras.Model):
    """Wraps the classifier; its batches are (image, label, group id) instead of sample weights.

    Logs the plain mean loss as loss (comparable with other runs), the objective as
    robust_loss, and the largest group weight as max_group_weight.
    """

    def __init__(self, classifier: keras.Model, n_groups: int, eta: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.classifier = classifier
        self.n_groups, self.eta = int(n_groups), float(eta)
        self.group_weights = self.add_weight(
            shape=(self.n_groups,),
            initializer=keras.initializers.Constant(1.0 / self.n_groups),
            trainable=False,
            name="group_weights",
            dtype="float32",
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.robust_tracker = keras.metrics.Mean(name="robust_loss")
        self.auc = keras.metrics.AUC(name="auc")
        self.accuracy = keras.metrics.BinaryAccuracy(name="accuracy")

    @property
    def metrics(self) -> list:
        return [self.loss_tracker, self.robust_tracker, self.auc, self.accuracy]

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return self.classifier(x, training=training)

    def _per_image_loss(self, y: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return keras.losses.binary_crossentropy(y, tf.cast(y_pred, "float32"))

    def train_step(self, batch: tuple) -> dict:
        x, y, groups = batch
        onehot = tf.one_hot(tf.cast(groups, "int32"), self.n_groups, dtype="float32")  # (B, G)
        counts = tf.reduce_sum(onehot, axis=0)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            per_image = self._per_image_loss(y, y_pred)
            group_loss = tf.reduce_sum(onehot * per_image[:, None], axis=0) / tf.maximum(
                counts, 1.0
            )
            q = update_group_weights(
                tf.convert_to_tensor(self.group_weights),
                tf.stop_gradient(group_loss),
                counts > 0,
                self.eta,
            )
            robust = tf.reduce_sum(q * group_loss)
            scaled = self.optimizer.scale_loss(robust)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self.group_weights.assign(q)
        self.loss_tracker.update_state(tf.reduce_mean(per_image))
        self.robust_tracker.update_state(robust)
        self.auc.update_state(y, y_pred)
        self.accuracy.update_state(y, y_pred)
        logs = {m.name: m.result() for m in self.metrics}
        logs["max_group_weight"] = tf.reduce_max(q)
        return logs

    def test_step(self, batch: tuple) -> dict:
        x, y = batch[:2]
        y_pred = self(x, training=False)
        self.loss_tracker.update_state(tf.reduce_mean(self._per_image_loss(y, y_pred)))
        self.auc.update_state(y, y_pred)
        self.accuracy.update_state(y, y_pred)
        return {m.name: m.result() for m in (self.loss_tracker, self.auc, self.accuracy)}


class GroupDROObjective(Objective):
    """--group-dro ETA: the worst (source, class) group's loss instead of the weighted mean."""

    name = "group_dro"

    def __init__(self, eta: float) -> None:
        if eta <= 0:
            raise ValueError("--group-dro must be positive")
        self.eta = eta

    def describe(self) -> dict[str, object]:
        """The flag, under the name earlier runs recorded it by."""
        return {"objective": self.name, "group_dro": self.eta}

    def ids(
        self, train: Sequence[data.Record], val: Sequence[data.Record]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Group ids of train; validation is scored as plain training does."""
        groups, self.names = group_indices(train)
        return groups, np.zeros(len(val), np.int32)

    def training_model(self, classifier: keras.Model, train: Sequence[data.Record]) -> keras.Model:
        """GroupDRO wrapping the classifier."""
        _, names = group_indices(train)
        log("group_dro", groups=len(names), eta=self.eta)
        return GroupDRO(classifier, len(names), self.eta)

    def compile_args(self) -> dict:
        """GroupDRO computes its own loss and metrics."""
        return {}

    def train_batch(self, image, label, weight, ids) -> tuple:
        """(image, label, group id): the group replaces the sample weight."""
        return image, label, ids

    def finish(self, training: keras.Model) -> None:
        """Log where the group weights ended (the last epoch's, not the best's)."""
        weights = keras.ops.convert_to_numpy(training.group_weights)
        log("group_weights", **{n: float(w) for n, w in zip(self.names, weights, strict=True)})
