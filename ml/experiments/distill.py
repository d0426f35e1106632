"""--distill-from MODEL_DIR: train the classifier (the student) on a teacher's soft targets too.

Knowledge distillation (Hinton et al. 2015) for one sigmoid output: the loss is
alpha * BCE(label, p) + (1 - alpha) * BCE(teacher's p, p), each image's term weighted as the
plain objective weights it. The teacher (any artifact, e.g. an ImageNet-initialised
EfficientNet-Lite fine-tuned here) sees the very augmented batch the student sees, in inference
mode, so its targets follow the augmentation. It keeps the input size it was trained at: a batch
of another size is resized (bilinear) for it, so a 64-px student can learn from a 128-px teacher
without querying it at a resolution it never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf

from ml.artifact import ArtifactError, load_weight_arrays, read_metadata
from ml.model import build_classifier
from ml.training import data
from ml.training.log import TrainingError, log
from ml.training.objective import Objective


def distillation_loss(
    y: tf.Tensor, teacher: tf.Tensor, student: tf.Tensor, alpha: float
) -> tf.Tensor:
    """Per-image alpha * BCE(y, student) + (1 - alpha) * BCE(teacher, student)."""
    y, teacher, student = (tf.cast(t, "float32") for t in (y, teacher, student))
    hard = keras.losses.binary_crossentropy(y, student)
    soft = keras.losses.binary_crossentropy(teacher, student)
    return alpha * hard + (1.0 - alpha) * soft


def load_teacher(model_dir: str | Path) -> keras.Model:
    """The artifact's classifier at its own input size, frozen."""
    meta = read_metadata(model_dir)
    teacher = build_classifier(meta.architecture, output_dtype="float32")
    teacher.set_weights(load_weight_arrays(model_dir, meta))
    teacher.trainable = False
    return teacher


class Distiller(keras.Model):
    """Wraps the student; trains it on labels and the frozen teacher's probabilities."""

    def __init__(self, student: keras.Model, teacher: keras.Model, alpha: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.student, self.teacher, self.alpha = student, teacher, float(alpha)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.auc = keras.metrics.AUC(name="auc")
        self.accuracy = keras.metrics.BinaryAccuracy(name="accuracy")
        self.agreement = keras.metrics.MeanAbsoluteError(name="teacher_gap")

    @property
    def metrics(self) -> list:
        return [self.loss_tracker, self.auc, self.accuracy, self.agreement]

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return self.student(x, training=training)

    def teacher_input(self, x: tf.Tensor) -> tf.Tensor:
        """The batch at the teacher's input size (unchanged when the sizes agree)."""
        size = self.teacher.input_shape[1:3]
        if tuple(x.shape[1:3]) == tuple(size):
            return x
        return tf.image.resize(x, size, method="bilinear")

    def train_step(self, batch: tuple) -> dict:
        x, y, weight = batch
        soft = tf.stop_gradient(self.teacher(self.teacher_input(x), training=False))
        with tf.GradientTape() as tape:
            p = self(x, training=True)
            per_image = distillation_loss(y, soft, p, self.alpha)
            loss = tf.reduce_sum(per_image * weight) / tf.maximum(tf.reduce_sum(weight), 1e-6)
            scaled = self.optimizer.scale_loss(loss)
        variables = self.student.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self.loss_tracker.update_state(loss)
        self.auc.update_state(y, p)
        self.accuracy.update_state(y, p)
        self.agreement.update_state(soft, p)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, batch: tuple) -> dict:
        x, y = batch[:2]
        p = self(x, training=False)
        self.loss_tracker.update_state(tf.reduce_mean(keras.losses.binary_crossentropy(y, p)))
        self.auc.update_state(y, p)
        self.accuracy.update_state(y, p)
        return {m.name: m.result() for m in (self.loss_tracker, self.auc, self.accuracy)}


class Distillation(Objective):
    """The Distiller as an objective of ml.training.loop.fit."""

    name = "distillation"

    def __init__(self, teacher_dir: str, alpha: float = 0.5) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("--distill-alpha must lie in [0, 1]")
        try:
            self.teacher_version = read_metadata(teacher_dir).model_version
        except ArtifactError as exc:
            raise ValueError(f"--distill-from: {exc.message}") from exc
        self.teacher_dir, self.alpha = str(teacher_dir), alpha

    def describe(self) -> dict[str, object]:
        """The teacher's version and the mixing weight."""
        return {
            "objective": self.name,
            "distill_from": self.teacher_version,
            "distill_alpha": self.alpha,
        }

    def training_model(self, classifier: keras.Model, train: Sequence[data.Record]) -> keras.Model:
        """The Distiller around the student, with the teacher at its own input size."""
        try:
            teacher = load_teacher(self.teacher_dir)
        except Exception as exc:
            raise TrainingError(f"--distill-from {self.teacher_dir}: {exc}") from exc
        log("distillation", teacher=self.teacher_version, alpha=self.alpha)
        return Distiller(classifier, teacher, self.alpha)

    def compile_args(self) -> dict:
        """The Distiller computes its own loss and metrics."""
        return {}
