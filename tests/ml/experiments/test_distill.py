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


def test_a_teacher_of_another_input_size_sees_the_batch_at_its_own_size() -> None:
    # A 128-px teacher and a 64-px student, in miniature: 8x8 against 4x4.
    def model(size: int, weight: float) -> keras.Model:
        layers = [keras.Input((size, size, 3)), keras.layers.GlobalAveragePooling2D()]
        net = keras.Sequential([*layers, keras.layers.Dense(1, activation="sigmoid")])
        net.set_weights([np.full((3, 1), weight, np.float32), np.zeros(1, np.float32)])
        return net

    teacher, student = model(8, 1.0), model(4, 0.0)
    teacher.trainable = False
    distiller = Distiller(student, teacher, alpha=0.0)
    x = np.stack([np.full((4, 4, 3), v, np.float32) for v in (-1.0, 0.5)])
    seen = distiller.teacher_input(tf.constant(x))
    assert tuple(seen.shape) == (2, 8, 8, 3)
    want = np.broadcast_to(np.array([-1.0, 0.5], np.float32)[:, None, None, None], (2, 8, 8, 3))
    np.testing.assert_allclose(seen.numpy(), want, rtol=1e-6)  # flat images stay flat
    distiller.compile(optimizer=keras.optimizers.SGD(1.0))
    distiller.fit(x, np.zeros((2, 1), np.float32), sample_weight=np.ones(2, np.float32), verbose=0)
    assert float(distiller.agreement.result()) > 0.1  # the teacher answered: sigmoid(3 v) != 0.5


def test_teacher_must_be_a_model_artifact(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--distill-from"):
        Distillation(str(tmp_path), 0.5)
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
