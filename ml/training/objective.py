"""What the training loop optimises: the plain objective, and the hooks an experiment overrides.

ml.training.loop.fit(config, objective=...) knows only this interface. The plain objective
trains the classifier itself on class-weighted binary cross-entropy; research objectives
(ml.experiments: a source adversary, group DRO) subclass it to wrap the classifier in another
training model, tag batches with per-image ids, and add callbacks, without a branch in the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from ml.training import data


class Objective:
    """Class-weighted binary cross-entropy on the classifier (the recipe's default)."""

    name = "plain"
    # Layers besides the classifier's head that train in the frozen-backbone phase.
    head_layers: tuple[str, ...] = ()

    def describe(self) -> dict[str, object]:
        """Settings recorded in training_config.json and the artifact's training_data."""
        return {"objective": self.name}

    def ids(
        self, train: Sequence[data.Record], val: Sequence[data.Record]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-image integer ids that batches carry (train, val), or None."""
        return None

    def training_model(self, classifier: keras.Model, train: Sequence[data.Record]) -> keras.Model:
        """The model that is fitted and checkpointed; it shares its layers with classifier."""
        return classifier

    def compile_args(self) -> dict:
        """Loss and metrics for compile()."""
        return {
            "loss": "binary_crossentropy",
            "metrics": [
                keras.metrics.AUC(name="auc"),
                keras.metrics.BinaryAccuracy(name="accuracy"),
            ],
        }

    def train_batch(
        self, image: tf.Tensor, label: tf.Tensor, weight: tf.Tensor, ids: tf.Tensor
    ) -> tuple:
        """One training batch as the training model takes it."""
        return image, label, weight

    def eval_batch(self, image: tf.Tensor, label: tf.Tensor, ids: tf.Tensor) -> tuple:
        """One validation batch as the training model takes it."""
        return image, label

    def callbacks(self, epochs: int) -> list[keras.callbacks.Callback]:
        """Callbacks of this objective, run before the checkpointing ones."""
        return []

    def finish(self, training: keras.Model) -> None:
        """After the last epoch (e.g. log where learned weights ended)."""


PLAIN = Objective()
