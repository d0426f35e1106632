"""The training loop of ml.train: build ResNet50 and fit it in phases, resuming if asked.

Random init trains everything in one phase. Pretrained weights mean two: the head alone with
the backbone frozen, then all but BatchNorm at a tenth of the learning rate. Each epoch is
checkpointed (ml.checkpoints); the best epoch's weights are what the caller gets back.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import keras
import numpy as np

from ml import data
from ml.checkpoints import CHECKPOINT_DIR, NEW_STATE, EpochCheckpoint, restore_rng
from ml.model import OUTPUT_LAYER, architecture, build_resnet50
from ml.train_adversary import (
    ADVERSARY_LAYER,
    AdversaryRamp,
    AliasLogs,
    adversarial_model,
    compile_args,
    source_indices,
    source_priors,
)
from ml.train_data import Augmentation, eval_dataset, train_dataset
from ml.train_dro import GroupDRO, group_indices
from ml.train_log import TrainingError, log

HEAD_LAYERS = (
    "head_dropout",
    OUTPUT_LAYER,
    "adversary_norm",
    "adversary_hidden",
    ADVERSARY_LAYER,
)


def _set_phase(model: keras.Model, phase: str) -> None:
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _set_phase(layer, phase)  # a wrapped classifier (ml.train_dro): its own layers
        elif phase == "head":
            layer.trainable = layer.name in HEAD_LAYERS
        elif phase == "finetune":
            # keras-io's fine-tuning advice: BatchNorm stays in inference mode on small data.
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        else:
            layer.trainable = True


def _compile_args() -> dict:
    return {
        "loss": "binary_crossentropy",
        "metrics": [keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
    }


def fit(
    args: argparse.Namespace,
    out: Path,
    split: dict[str, list[data.Record]],
    train_x: np.ndarray,
    val_x: np.ndarray,
    batch_size: int,
    verbose: int,
) -> tuple[keras.Model, dict]:
    """Train (or resume) and return the model holding the best epoch's weights, and the state.

    With --source-adversary the model trained (and checkpointed) is ml.train_adversary's, with
    --group-dro ml.train_dro's; both share their layers with the classifier returned.
    """
    ckpt = out / CHECKPOINT_DIR
    ckpt.mkdir(exist_ok=True)
    state_path = ckpt / "state.json"
    state = json.loads(state_path.read_text()) if args.resume else dict(NEW_STATE, history=[])
    arch = architecture(args.input_size)
    try:
        model = build_resnet50(
            args.input_size,
            weights=args.weights,
            dropout=arch["dropout"],
            seed=args.seed,
            output_dtype="float32",
        )
    except FileNotFoundError as exc:
        raise TrainingError(str(exc)) from exc
    except Exception as exc:
        if args.weights != "imagenet":
            raise
        raise TrainingError(
            f"ImageNet weights could not be fetched ({exc}); download "
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 and pass its path"
        ) from exc
    resume_from = ckpt / "last.weights.h5" if args.resume else None

    records = split["train"]
    y = np.array([r.target for r in records], dtype=np.float32)
    sources = val_sources = groups = group_names = None
    training, compiled = model, _compile_args()
    if args.source_adversary:
        ids, names = source_indices([*records, *split["val"]])
        sources, val_sources = ids[: len(records)], ids[len(records) :]
        priors = None
        if args.adversary_loss == "confusion":
            priors = source_priors(y.astype(np.intp), sources, len(names))
        training = adversarial_model(model, len(names), args.source_adversary, priors)
        compiled = compile_args()
        log(
            "adversary",
            sources=len(names),
            scale=args.source_adversary,
            loss=args.adversary_loss,
        )
    if args.group_dro:
        groups, group_names = group_indices(records)
        training, compiled = GroupDRO(model, len(group_names), args.group_dro), {}
        log("group_dro", groups=len(group_names), eta=args.group_dro)
    if args.balance_sources:
        sampling, weights = data.source_balanced_probabilities(records), np.ones_like(y)
    else:
        sampling, weights = None, data.class_weights(records)
    val_y = np.array([r.target for r in split["val"]], dtype=np.float32)
    val_ds = eval_dataset(val_x, val_y, batch_size, val_sources)
    steps = math.ceil(len(y) / batch_size)

    pretrained = args.weights is not None
    warmup = min(args.warmup_epochs, args.epochs) if pretrained else 0
    phases = [("head", 0, warmup, args.lr)] if warmup else []
    phases.append(
        (
            "finetune" if pretrained else "full",
            warmup,
            args.epochs,
            args.lr / 10 if pretrained else args.lr,
        )
    )
    for phase, first, last, lr in phases:
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
        _set_phase(training, phase)
        training.compile(
            optimizer=keras.optimizers.Adam(lr), run_eagerly=args.run_eagerly, **compiled
        )
        if resume_from:
            # Keras checkpoints hold the optimizer too: with the same trainable variables,
            # Adam's moments and step count are restored along with the weights.
            training.optimizer.build(training.trainable_variables)
            training.load_weights(resume_from)
            restore_rng(training, state)
            resume_from = None
        orders = np.stack(
            [data.epoch_order(len(y), e, args.seed, sampling) for e in range(initial, last)]
        )
        ds = train_dataset(
            train_x,
            y,
            weights,
            orders,
            batch_size,
            initial * steps,
            args.seed,
            Augmentation(args.augment, args.hflip),
            sources,
            groups,
        )
        callbacks = [
            *([AliasLogs()] if args.source_adversary else []),
            *(
                [AdversaryRamp(args.epochs)]
                if args.source_adversary and args.adversary_ramp
                else []
            ),
            keras.callbacks.ReduceLROnPlateau(
                "val_auc",
                mode="max",
                factor=0.5,
                patience=max(1, args.patience // 2),
                min_lr=1e-6,
                verbose=0,
            ),
            EpochCheckpoint(ckpt, state, phase, len(y), batch_size, args.patience),
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
    if group_names is not None:
        # Where the weight went by the end of training (the last epoch's, not the best's).
        weights = keras.ops.convert_to_numpy(training.group_weights)
        log("group_weights", **{n: float(w) for n, w in zip(group_names, weights, strict=True)})
    best = ckpt / "best.weights.h5"
    training.load_weights(best if best.exists() else ckpt / "last.weights.h5")
    return model, state
