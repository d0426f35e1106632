"""Tests for ml.experiments.distill: the loss, a toy student learning a teacher, a tiny real run."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from ml.artifact import read_metadata
from ml.experiments.distill import Distillation, Distiller, distillation_loss
from ml.predictor import Predictor
from ml.training import train
from tests.ml.conftest import TINY, run_train, tiny_manifest


def _bce(t: float, p: float) -> float:
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_loss_mixes_the_label_and_the_teacher_by_alpha() -> None:
    y, teacher, student = (tf.constant([[v]]) for v in (1.0, 0.2, 0.6))
    for alpha in (0.0, 0.3, 1.0):
        got = float(distillation_loss(y, teacher, student, alpha)[0])
        want = alpha * _bce(1.0, 0.6) + (1 - alpha) * _bce(0.2, 0.6)
        assert got == pytest.approx(want, rel=1e-4)
    # With alpha 0 the loss is smallest where the student says what the teacher says.
    losses = [float(distillation_loss(y, teacher, tf.constant([[p]]), 0.0)[0]) for p in (0.1, 0.2, 0.4)]
    assert losses[1] < losses[0] and losses[1] < losses[2]


def test_a_toy_student_learns_the_teachers_probabilities_not_only_the_labels() -> None:
    # Teacher: p = sigmoid(3 x); labels are its hard decisions. A student fitted on labels alone
    # grows over-confident; with alpha 0 it recovers the teacher's slope.
    keras.utils.set_random_seed(0)
    x = np.linspace(-2, 2, 200, dtype=np.float32)[:, None]
    y = (x > 0).astype(np.float32)
    teacher = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    teacher.set_weights([np.array([[3.0]], np.float32), np.zeros(1, np.float32)])
    teacher.trainable = False
    student = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    model = Distiller(student, teacher, alpha=0.0)
    model.compile(optimizer=keras.optimizers.Adam(0.1))
    model.fit(x, y, sample_weight=np.ones(len(x), np.float32), batch_size=50, epochs=80, verbose=0)
    slope = float(student.get_weights()[0][0, 0])
    assert slope == pytest.approx(3.0, abs=0.4)
    np.testing.assert_array_equal(teacher.get_weights()[0], [[3.0]])  # the teacher never moves


def test_teacher_must_be_a_model_artifact(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--distill-from"):
        Distillation(str(tmp_path), 0.5, 32)
    with pytest.raises(SystemExit):
        train.parse_args(["--manifest", "m", "--out", "o", "--distill-from", str(tmp_path)])


def test_tiny_distilled_run_exports_a_servable_student(tiny_model_dir: Path, tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path / "manifest.csv")
    out = tmp_path / "student"
    proc = run_train(
        "--manifest", str(manifest), "--out", str(out), *TINY, "--epochs", "1",
        "--distill-from", str(tiny_model_dir), "--distill-alpha", "0.3",
    )  # fmt: skip
    teacher = read_metadata(tiny_model_dir).model_version
    assert f"event=distillation teacher={teacher} alpha=0.3" in proc.stdout
    meta = read_metadata(out)
    assert meta.training_data["distill_from"] == teacher
    assert meta.training_data["distill_alpha"] == 0.3
    assert Predictor.load(out).predict([np.zeros((40, 40), np.float32)])[0].trained
