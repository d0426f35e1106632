"""The training schedule's phases: one for random init; head, then fine-tuning, for pretrained.

Shared by both routes (ml.training.loop on TensorFlow, ml.training.portable on any Keras
backend); Keras only.
"""

from __future__ import annotations

import keras

from ml.model import OUTPUT_LAYER
from ml.training.config import Recipe, pretrained

HEAD_LAYERS = ("head_dropout", OUTPUT_LAYER)


def schedule(config: Recipe) -> list[tuple[str, int, int, float]]:
    """(phase, first epoch, last epoch, learning rate) in order."""
    was_trained = pretrained(config)
    warmup = min(config.warmup_epochs, config.epochs) if was_trained else 0
    phases = [("head", 0, warmup, config.lr)] if warmup else []
    last_lr = config.lr / 10 if was_trained else config.lr
    phases.append(("finetune" if was_trained else "full", warmup, config.epochs, last_lr))
    return phases


def set_phase(model: keras.Model, phase: str, head: tuple[str, ...] = HEAD_LAYERS) -> None:
    """Make trainable what the phase trains: the head alone, all but BatchNorm, or all."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            set_phase(layer, phase, head)  # a wrapped classifier (ml.experiments.dro)
        elif phase == "head":
            layer.trainable = layer.name in head
        elif phase == "finetune":
            # keras-io's fine-tuning advice: BatchNorm stays in inference mode on small data.
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        else:
            layer.trainable = True
