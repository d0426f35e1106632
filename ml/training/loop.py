"""The training loop of ml.training.train: build ResNet50 and fit it in phases, resuming if asked.

Random init trains everything in one phase. Pretrained weights mean two: the head alone with
the backbone frozen, then all but BatchNorm at a tenth of the learning rate. Each epoch is
checkpointed (ml.training.checkpoints); the best epoch's weights are what the caller gets back.
What is optimised is the objective's business (ml.training.objective): the loop has no
experiment of its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from ml.model import architecture, build_classifier
from ml.training import data
from ml.training.checkpoints import CHECKPOINT_DIR, NEW_STATE, EpochCheckpoint, restore_rng
from ml.training.config import TrainConfig
from ml.training.log import TrainingError, log
from ml.training.objective import PLAIN, Objective
from ml.training.phases import HEAD_LAYERS, schedule, set_phase
from ml.training.pipeline import Augmentation, eval_dataset, train_dataset
from ml.training.pretrained import PretrainedWeightsError


@dataclass(frozen=True)
class Images:
    """The split and its cached grey-level train and val images (ml.training.data)."""

    split: dict[str, list[data.Record]]
    train_x: np.ndarray
    val_x: np.ndarray


def _build(config: TrainConfig) -> keras.Model:
    arch = architecture(config.input_size, backbone=config.backbone)
    weights = config.weights or ("imagenet" if config.init == "imagenet" else None)
    try:
        return build_classifier(arch, weights=weights, seed=config.seed, output_dtype="float32")
    except (FileNotFoundError, PretrainedWeightsError) as exc:
        raise TrainingError(str(exc)) from exc
    except Exception as exc:
        if weights != "imagenet" or config.backbone != "resnet50":
            raise
        raise TrainingError(
            f"ResNet50 ImageNet weights could not be fetched ({exc}): none are installable "
            "here; pass a local resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 with "
            "--weights FILE, or use --backbone efficientnet-lite0"
        ) from exc


def fit(
    config: TrainConfig,
    images: Images,
    batch_size: int,
    verbose: int,
    objective: Objective = PLAIN,
) -> tuple[keras.Model, dict]:
    """Train (or resume) and return the classifier holding the best epoch's weights, and the
    state. The model trained and checkpointed is objective.training_model(classifier)."""
    out = Path(config.out)
    ckpt = out / CHECKPOINT_DIR
    ckpt.mkdir(exist_ok=True)
    state_path = ckpt / "state.json"
    state = json.loads(state_path.read_text()) if config.resume else dict(NEW_STATE, history=[])
    model = _build(config)
    resume_from = ckpt / "last.weights.h5" if config.resume else None

    records, val_records = images.split["train"], images.split["val"]
    y = np.array([r.target for r in records], dtype=np.float32)
    ids = objective.ids(records, val_records)
    train_ids, val_ids = ids if ids is not None else (None, None)
    training = objective.training_model(model, records)
    compiled = objective.compile_args()
    if config.balance_sources:
        sampling, weights = data.source_balanced_probabilities(records), np.ones_like(y)
    else:
        sampling, weights = None, data.class_weights(records)
    val_y = np.array([r.target for r in val_records], dtype=np.float32)
    val_ds = eval_dataset(images.val_x, val_y, batch_size, objective, val_ids)
    steps = math.ceil(len(y) / batch_size)
    head = (*HEAD_LAYERS, *objective.head_layers)

    for phase, first, last, lr in schedule(config):
        if state["stopped_early"] or state["epoch"] >= last:
            continue
        initial = max(first, state["epoch"])
        same_phase = state["phase"] == phase
        if same_phase and state["lr"]:
            lr = state["lr"]  # resumed inside this phase: keep any plateau reductions
        elif initial == first and phase == "finetune":
            state["since_best"] = 0  # a new phase gets its full patience
        if resume_from and not same_phase:
            training.load_weights(resume_from)  # before compile: a new phase starts a fresh Adam
            restore_rng(training, state)
            resume_from = None
        set_phase(training, phase, head)
        training.compile(
            optimizer=keras.optimizers.Adam(lr), run_eagerly=config.run_eagerly, **compiled
        )
        if resume_from:
            # Keras checkpoints hold the optimizer too: with the same trainable variables,
            # Adam's moments and step count are restored along with the weights.
            training.optimizer.build(training.trainable_variables)
            training.load_weights(resume_from)
            restore_rng(training, state)
            resume_from = None
        orders = np.stack(
            [data.epoch_order(len(y), e, config.seed, sampling) for e in range(initial, last)]
        )
        ds = train_dataset(
            images.train_x,
            y,
            weights,
            orders,
            batch_size,
            initial * steps,
            config.seed,
            Augmentation(config.augment, config.hflip),
            objective,
            train_ids,
        )
        callbacks = [
            *objective.callbacks(config.epochs),
            keras.callbacks.ReduceLROnPlateau(
                "val_auc",
                mode="max",
                factor=0.5,
                patience=max(1, config.patience // 2),
                min_lr=1e-6,
                verbose=0,
            ),
            EpochCheckpoint(ckpt, state, phase, len(y), batch_size, config.patience),
        ]
        log("phase", phase=phase, first_epoch=initial + 1, last_epoch=last, lr=lr, steps=steps)
        training.fit(
            ds,
            epochs=last,
            initial_epoch=initial,
            steps_per_epoch=steps,
            validation_data=val_ds,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the dataset is already shuffled, per epoch and seeded
        )
    objective.finish(training)
    best = ckpt / "best.weights.h5"
    training.load_weights(best if best.exists() else ckpt / "last.weights.h5")
    return model, state
