"""Train the COVID-19 ResNet50 classifier and write a model artifact the service can load.

Each image is decoded and preprocessed once, with the same ml.preprocess functions serving
uses, into an in-memory cache; tf.data then shuffles, augments (rotation, shift, zoom,
brightness/contrast; no flips by default) and batches it. The split is patient-disjoint.
The threshold is chosen on validation from the exported float16 artifact's own predictions,
so it matches what is served. Research use only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

# Must happen before TensorFlow is first imported; setdefault keeps an explicit choice.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ml import data  # noqa: E402
from ml.artifact import METADATA_FILE, ModelMetadata, write_artifact  # noqa: E402
from ml.imaging import decode_image  # noqa: E402
from ml.metrics import choose_threshold  # noqa: E402
from ml.model import OUTPUT_LAYER, architecture, build_resnet50  # noqa: E402
from ml.preprocess import (  # noqa: E402
    IMAGENET_BGR_MEAN,
    PREPROCESS_VERSION,
    SUPPORTED_PREPROCESS_VERSIONS,
)

CHECKPOINT_DIR = "checkpoint"
# state.json: epochs finished, early-stopping bookkeeping, the next epoch's learning rate.
NEW_STATE = {
    "epoch": 0,
    "best_val_auc": -1.0,
    "best_epoch": 0,
    "since_best": 0,
    "stopped_early": False,
    "lr": None,
    "phase": None,
}
HEAD_LAYERS = ("head_dropout", OUTPUT_LAYER)
# Augmentation strengths: small, as a radiograph's position varies little.
ROTATION_DEG, SHIFT, ZOOM, BRIGHTNESS, CONTRAST = 7.0, 0.06, 0.08, 0.05, 0.10
# These define the data and the model: a resumed run must use the same values.
RESUME_MUST_MATCH = (
    "manifest",
    "split",
    "input_size",
    "preprocess_version",
    "weights",
    "seed",
    "val_fraction",
    "test_fraction",
    "exclude_source",
    "limit",
    "balance_sources",
)
EXAMPLES = """examples:
  # the reference run on this CPU (see docs/training.md for timings):
  python -m ml.train --manifest ../shared/data/cxr/manifest.csv --out models/cxr
  # GPU, ImageNet backbone from a local file (two-phase fine-tuning):
  python -m ml.train --manifest DATA --out models/cxr224 --input-size 224 \\
      --weights resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5
  # continue after a kill (same --out and data options; --epochs may grow):
  python -m ml.train --manifest DATA --out models/cxr --resume
  # leave one source out (then evaluate on all of that source's images):
  python -m ml.train --manifest DATA --out models/loso-hannover --exclude-source hannover-mhh
"""


def log(event: str, **fields: object) -> None:
    """Print one key=value line: counts and settings, never patient identifiers."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text.replace(' ', '_')}")
    print(" ".join(parts), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see --help)."""
    p = argparse.ArgumentParser(
        prog="python -m ml.train",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data and output")
    g.add_argument(
        "--manifest",
        required=True,
        metavar="PATH",
        help="manifest CSV (file,label,patient_id,source,view; file relative to the CSV), a "
        "folder holding manifest.csv, or a folder with one subfolder per class (covid/, ...)",
    )
    g.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="artifact directory: metadata.json + weights.npz, and split.csv, history.json, "
        "training_config.json, training_curves.png, checkpoint/",
    )
    g.add_argument("--split", metavar="CSV", help="reuse this split file instead of making one")
    g.add_argument("--val-fraction", type=float, default=0.15, help="default: %(default)s")
    g.add_argument(
        "--test-fraction",
        type=float,
        default=0.15,
        help="held out for ml.evaluate, never touched here (default: %(default)s)",
    )
    g.add_argument(
        "--exclude-source",
        action="append",
        default=[],
        metavar="NAME",
        help="drop this source from train and val (repeatable), for leave-one-source-out",
    )
    g.add_argument(
        "--limit", type=int, metavar="N", help="only the first N images per class (smoke tests)"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from --out/checkpoint after the last finished epoch, with the same "
        "split; weights, Adam state, learning rate and early stopping carry over",
    )
    g.add_argument(
        "--force", action="store_true", help="start over even if --out holds a model/checkpoint"
    )

    g = p.add_argument_group("model and schedule")
    g.add_argument(
        "--input-size",
        type=int,
        default=128,
        help="model input side in pixels (default: %(default)s, to fit a CPU budget; 224 on GPU)",
    )
    g.add_argument(
        "--preprocess-version",
        default=PREPROCESS_VERSION,
        choices=SUPPORTED_PREPROCESS_VERSIONS,
        help="ml.preprocess version; 2 crops borders and equalises (default: %(default)s)",
    )
    g.add_argument(
        "--weights",
        metavar="imagenet|FILE",
        help="backbone init: random (default), 'imagenet' (Keras download or cache), or a "
        "local ResNet50 notop weights file. Pretrained weights mean two phases: "
        "--warmup-epochs with the backbone frozen, then all but BatchNorm at --lr/10",
    )
    g.add_argument(
        "--warmup-epochs",
        type=int,
        default=3,
        help="head-only epochs with pretrained weights (default: %(default)s)",
    )
    g.add_argument("--epochs", type=int, default=30, help="total epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=int, help="default: 32 on CPU, 64 on a GPU")
    g.add_argument(
        "--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)"
    )
    g.add_argument(
        "--patience",
        type=int,
        default=6,
        help="stop after this many epochs without a better val AUROC; the best epoch is "
        "exported (default: %(default)s)",
    )
    g.add_argument(
        "--balance-sources",
        action="store_true",
        help="sample every (source, class) group of train equally often, each class half the "
        "time, instead of class-weighting the loss",
    )
    g.add_argument(
        "--hflip",
        action="store_true",
        help="also flip left-right (off by default: anatomy is not symmetric)",
    )
    g.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.90,
        help="threshold = highest score reaching this sensitivity on val (default: %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds split, init, order, augmentation (default: %(default)s)",
    )

    g = p.add_argument_group("runtime")
    g.add_argument(
        "--mixed-precision",
        choices=("auto", "off", "fp16", "bf16"),
        default="auto",
        help="auto: fp16 on a GPU, off (float32) on CPU; bf16 speeds up CPUs with AMX or "
        "AVX512-BF16. The artifact is always float32-served (default: %(default)s)",
    )
    g.add_argument(
        "--run-eagerly",
        action="store_true",
        help="debugging and tiny smoke runs: skip tracing the train step (~30 s on 2 cores), "
        "at a much slower step",
    )
    g.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        help="Keras progress: 1 bar, 2 a line per epoch (default: 1 on a terminal, else 2)",
    )
    args = p.parse_args(argv)
    if args.input_size < 32:
        p.error("--input-size must be at least 32 (ResNet50 minimum)")
    if args.epochs < 1 or args.patience < 1 or args.warmup_epochs < 0:
        p.error("--epochs and --patience must be at least 1, --warmup-epochs at least 0")
    if (args.batch_size is not None and args.batch_size < 1) or (args.limit or 1) < 1:
        p.error("--batch-size and --limit must be positive")
    if not 0.0 < args.target_sensitivity <= 1.0:
        p.error("--target-sensitivity must lie in (0, 1]")
    return args


class TrainingError(Exception):
    """A problem with the inputs that the user has to fix."""


# --- data ----------------------------------------------------------------------------------


def make_split(args: argparse.Namespace, out: Path) -> dict[str, list[data.Record]]:
    """Load the manifest, make (or reuse) the split, then apply --limit and --exclude-source."""
    try:
        records = data.load_manifest(args.manifest)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    unknown = sorted(set(args.exclude_source) - {r.source for r in records})
    if unknown:
        raise TrainingError(f"--exclude-source: no source named {unknown} in the manifest")
    pool = data.limit_per_class(records, args.limit) if args.limit else records
    split_file = out / "split.csv" if args.resume else args.split
    try:
        if split_file:
            keep = {r.key for r in pool}
            full = data.read_split(split_file, records)
            split = {name: [r for r in rs if r.key in keep] for name, rs in full.items()}
        else:
            split = data.split_by_patient(pool, args.val_fraction, args.test_fraction, args.seed)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"split: {exc}") from exc
    for name in ("train", "val"):
        split[name] = [r for r in split[name] if r.source not in args.exclude_source]
        if len({r.target for r in split[name]}) < 2:
            raise TrainingError(
                f"the {name} split needs COVID and non-COVID images; use more data or a "
                "larger --val-fraction"
            )
    return split


def augment(gray: tf.Tensor, seed: tf.Tensor, hflip: bool = False) -> tf.Tensor:
    """Random affine (rotation, shift, zoom: one interpolation) and brightness/contrast.

    Works on grey levels in [0, 255] of shape (B, H, W, 1), before the caffe mean is taken
    off, so clipping to the valid range stays simple. Stateless: seed fixes the result.
    """
    shape = tf.shape(gray)
    h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    u = tf.random.stateless_uniform([shape[0], 7], seed=seed, minval=-1.0, maxval=1.0)
    angle = u[:, 0] * (ROTATION_DEG * math.pi / 180.0)
    inv_zoom = 1.0 / (1.0 + u[:, 1] * ZOOM)
    cos, sin = tf.cos(angle) * inv_zoom, tf.sin(angle) * inv_zoom
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    tx, ty = u[:, 2] * SHIFT * w, u[:, 3] * SHIFT * h
    zero = tf.zeros_like(cos)
    # Each row maps an output pixel to the input pixel it samples: rotate and zoom about the
    # centre, then shift.
    transforms = tf.stack(
        [
            cos,
            -sin,
            cx - cos * cx + sin * cy - tx,
            sin,
            cos,
            cy - sin * cx - cos * cy - ty,
            zero,
            zero,
        ],
        axis=1,
    )
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=gray,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    if hflip:
        out = tf.where(u[:, 4, None, None, None] > 0.0, tf.reverse(out, axis=[2]), out)
    mean = tf.reduce_mean(out, axis=[1, 2, 3], keepdims=True)
    contrast = (1.0 + u[:, 5] * CONTRAST)[:, None, None, None]
    brightness = (u[:, 6] * BRIGHTNESS * 255.0)[:, None, None, None]
    return tf.clip_by_value((out - mean) * contrast + mean + brightness, 0.0, 255.0)


def to_caffe(gray: tf.Tensor) -> tf.Tensor:
    """TF twin of ml.preprocess.to_caffe: the same float32 operations, so the same values."""
    return tf.concat([gray, gray, gray], axis=-1) - tf.constant(IMAGENET_BGR_MEAN, tf.float32)


def train_dataset(
    x: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    orders: np.ndarray,
    batch_size: int,
    first_step: int,
    seed: int,
    hflip: bool,
) -> tf.data.Dataset:
    """Batches (image, label, sample weight) for the epochs in orders, one row per epoch."""
    with tf.device("/cpu:0"):
        images, labels = tf.constant(x[..., None]), tf.constant(y[:, None])
        sample_weights = tf.constant(weights)
    ds = tf.data.Dataset.from_tensor_slices(orders).flat_map(
        lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
    )

    def load(step: tf.Tensor, idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        step_seed = tf.stack([tf.constant(seed, tf.int64), step])
        gray = augment(tf.gather(images, idx), step_seed, hflip)
        return to_caffe(gray), tf.gather(labels, idx), tf.gather(sample_weights, idx)

    ds = ds.enumerate(start=first_step)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def eval_dataset(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Unaugmented batches, exactly the serving preprocessing."""
    ds = tf.data.Dataset.from_tensor_slices((x[..., None], y[:, None])).batch(batch_size)
    return ds.map(lambda g, t: (to_caffe(g), t)).prefetch(2)


# --- training ------------------------------------------------------------------------------


def _atomic_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _save_weights(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")  # Keras insists on the .weights.h5 suffix
    model.save_weights(tmp)
    os.replace(tmp, path)


def _current_lr(model: keras.Model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def _rng_variables(model: keras.Model) -> list:
    # Dropout's random state: not in Keras weight files, but needed for an exact resume.
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: record history, keep best and last weights, state.json, early stop."""

    def __init__(
        self, ckpt: Path, state: dict, phase: str, n_images: int, batch_size: int, patience: int
    ) -> None:
        super().__init__()
        self.ckpt, self.state, self.phase = ckpt, state, phase
        self.n_images, self.batch_size, self.patience = n_images, batch_size, patience
        self.may_stop = phase != "head"  # the frozen-backbone warm-up always runs in full

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.lr = _current_lr(self.model)
        self.start = time.perf_counter()
        self.first_step_end: float | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.last_step_end = time.perf_counter()
        if self.first_step_end is None:
            self.first_step_end = self.last_step_end

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        start, first, last = self.start, self.first_step_end or self.start, self.last_step_end
        st = self.state
        first_batch = min(self.n_images, self.batch_size)
        entry = {
            "epoch": epoch + 1,
            "phase": self.phase,
            "lr": self.lr,
            **{k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"},
            "epoch_seconds": time.perf_counter() - start,
            "train_seconds": last - start,
            "images_per_s": self.n_images / max(last - start, 1e-9),
            # Excludes the first step, which also traces and compiles the train function.
            "steady_images_per_s": (self.n_images - first_batch) / max(last - first, 1e-9),
        }
        st["history"].append(entry)
        st["epoch"] = epoch + 1
        val_auc = entry.get("val_auc", float("nan"))
        if math.isfinite(val_auc) and val_auc > st["best_val_auc"]:
            st.update(best_val_auc=val_auc, best_epoch=epoch + 1, since_best=0)
            _save_weights(self.model, self.ckpt / "best.weights.h5")
        else:
            st["since_best"] += 1
        if self.may_stop and st["since_best"] >= self.patience:
            st["stopped_early"] = True
            self.model.stop_training = True
        st.update(lr=_current_lr(self.model), phase=self.phase)
        st["rng_state"] = [v.numpy().tolist() for v in _rng_variables(self.model)]
        _save_weights(self.model, self.ckpt / "last.weights.h5")
        _atomic_json(self.ckpt / "state.json", st)
        log(
            "epoch",
            epoch=epoch + 1,
            phase=self.phase,
            loss=entry["loss"],
            val_loss=entry.get("val_loss"),
            val_auc=val_auc,
            lr=self.lr,
            images_per_s=entry["images_per_s"],
            steady_images_per_s=entry["steady_images_per_s"],
            seconds=entry["epoch_seconds"],
            best_epoch=st["best_epoch"],
        )


def _restore_rng(model: keras.Model, state: dict) -> None:
    for variable, value in zip(_rng_variables(model), state.get("rng_state", []), strict=False):
        variable.assign(np.asarray(value, dtype=variable.dtype))


def _set_phase(model: keras.Model, phase: str) -> None:
    for layer in model.layers:
        if phase == "head":
            layer.trainable = layer.name in HEAD_LAYERS
        elif phase == "finetune":
            # keras-io's fine-tuning advice: BatchNorm stays in inference mode on small data.
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        else:
            layer.trainable = True


def fit(
    args: argparse.Namespace,
    out: Path,
    split: dict[str, list[data.Record]],
    train_x: np.ndarray,
    val_x: np.ndarray,
    batch_size: int,
    verbose: int,
) -> tuple[keras.Model, dict]:
    """Train (or resume) and return the model holding the best epoch's weights, and the state."""
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
    if args.balance_sources:
        sampling, weights = data.source_balanced_probabilities(records), np.ones_like(y)
    else:
        sampling, weights = None, data.class_weights(records)
    val_y = np.array([r.target for r in split["val"]], dtype=np.float32)
    val_ds = eval_dataset(val_x, val_y, batch_size)
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
            model.load_weights(resume_from)  # before compile: a new phase starts a fresh Adam
            _restore_rng(model, state)
            resume_from = None
        _set_phase(model, phase)
        model.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss="binary_crossentropy",
            metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
            run_eagerly=args.run_eagerly,
        )
        if resume_from:
            # Keras checkpoints hold the optimizer too: with the same trainable variables,
            # Adam's moments and step count are restored along with the weights.
            model.optimizer.build(model.trainable_variables)
            model.load_weights(resume_from)
            _restore_rng(model, state)
            resume_from = None
        orders = np.stack(
            [data.epoch_order(len(y), e, args.seed, sampling) for e in range(initial, last)]
        )
        ds = train_dataset(
            train_x, y, weights, orders, batch_size, initial * steps, args.seed, args.hflip
        )
        callbacks = [
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
        model.fit(
            ds,
            epochs=last,
            initial_epoch=initial,
            steps_per_epoch=steps,
            validation_data=val_ds,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the dataset is already shuffled, per epoch and seeded
        )
    best = ckpt / "best.weights.h5"
    model.load_weights(best if best.exists() else ckpt / "last.weights.h5")
    return model, state


# --- export and reports --------------------------------------------------------------------


def export(
    args: argparse.Namespace,
    out: Path,
    split: dict[str, list[data.Record]],
    model: keras.Model,
    state: dict,
    training_data: dict,
) -> ModelMetadata:
    """Write the artifact, with the threshold chosen from the float16 artifact's val scores."""
    from sklearn.metrics import roc_auc_score

    from ml.predictor import Predictor

    weights = model.get_weights()
    common = {
        "model_version": f"resnet50-cxr-{datetime.now(UTC):%Y%m%d}-{{sha8}}",
        "architecture": architecture(args.input_size),
        "trained": True,
        "training_data": training_data,
        "preprocess_version": args.preprocess_version,
    }
    staging = out / CHECKPOINT_DIR / "export"
    staged = write_artifact(staging, weights, **common)
    predictor = Predictor.load(staging)
    val = split["val"]
    scores = []
    for i in range(0, len(val), 32):
        pixels = [decode_image(r.path.read_bytes()).pixels for r in val[i : i + 32]]
        scores += [p.probability_covid for p in predictor.predict(pixels)]
    y, s = np.array([r.target for r in val]), np.array(scores)
    threshold = choose_threshold(y, s, args.target_sensitivity)
    predicted = s >= threshold
    metrics = {
        "split": "val",
        "note": "validation: the threshold was chosen here; see ml.evaluate for test",
        "val_images": len(val),
        "val_auroc": float(roc_auc_score(y, s)),
        "val_sensitivity": float(predicted[y == 1].mean()),
        "val_specificity": float((~predicted[y == 0]).mean()),
        "target_sensitivity": args.target_sensitivity,
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
    }
    meta = write_artifact(out, weights, threshold=threshold, metrics=metrics, **common)
    if meta.weights_sha256 != staged.weights_sha256:
        raise RuntimeError("exported weights differ from the ones the threshold was chosen on")
    shutil.rmtree(staging)
    return meta


def write_reports(out: Path, state: dict) -> None:
    """history.json and training_curves.png (loss, accuracy, AUROC; train vs val)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe anywhere
    from matplotlib.ticker import MaxNLocator

    history = state["history"]
    _atomic_json(
        out / "history.json",
        {k: v for k, v in state.items() if k != "history"} | {"epochs": history},
    )
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    for ax, key, title in zip(
        fig.subplots(1, 3), ("loss", "accuracy", "auc"), ("Loss", "Accuracy", "AUROC"), strict=True
    ):
        ax.plot(epochs, [h.get(key) for h in history], "o-", label="train", ms=3)
        ax.plot(epochs, [h.get(f"val_{key}") for h in history], "o-", label="val", ms=3)
        if state["best_epoch"]:
            ax.axvline(state["best_epoch"], color="grey", ls="--", lw=1, label="best epoch")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(out / "training_curves.png", dpi=100)


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def _prepare_out(args: argparse.Namespace, out: Path) -> dict | None:
    """Return the saved config when resuming; never clobber a model by accident."""
    if args.resume:
        if not (out / CHECKPOINT_DIR / "state.json").is_file():
            raise TrainingError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}")
        saved = json.loads((out / "training_config.json").read_text())
        changed = [k for k in RESUME_MUST_MATCH if saved["args"].get(k) != vars(args)[k]]
        if changed:
            raise TrainingError(f"--resume with other {changed} than the checkpoint; use --force")
        return saved
    if ((out / METADATA_FILE).exists() or (out / CHECKPOINT_DIR).exists()) and not args.force:
        raise TrainingError(f"{out} already holds a model or checkpoint; use --resume or --force")
    return None


def run(args: argparse.Namespace) -> ModelMetadata:
    """Everything main() does, raising TrainingError for user mistakes."""
    out = Path(args.out)
    saved = _prepare_out(args, out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    precision = (
        args.mixed_precision if args.mixed_precision != "auto" else ("fp16" if gpus else "off")
    )
    policy = {"off": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}[precision]
    batch_size = args.batch_size or (64 if gpus else 32)
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    keras.utils.set_random_seed(args.seed)
    log(
        "start",
        device="gpu" if gpus else "cpu",
        policy=policy,
        batch_size=batch_size,
        input_size=args.input_size,
        preprocess_version=args.preprocess_version,
        resume=args.resume,
    )

    split = make_split(args, out)
    if not args.resume:
        # Only now that the inputs are known to be usable: --force starts over.
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    split_sha = data.write_split(split, out / "split.csv")
    summary = data.split_summary(split)
    for name, s in summary.items():
        log(
            "split",
            split=name,
            images=s["images"],
            patients=s["patients"],
            covid=s["by_target"].get("covid", 0),
            sources=len(s["by_source"]),
        )
    config = {
        "args": vars(args),
        "resolved": {"batch_size": batch_size, "dtype_policy": policy, "verbose": verbose},
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
        },
        "device": [d.name for d in gpus] or [platform.machine()],
        "git_commit": _git_commit(),
        "seed": args.seed,
        "split_sha256": split_sha,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if saved is not None:
        config["previous_runs"] = [*saved.pop("previous_runs", []), saved]
    _atomic_json(out / "training_config.json", config)

    start = time.perf_counter()
    try:
        train_x = data.load_gray_images(split["train"], args.input_size, args.preprocess_version)
        val_x = data.load_gray_images(split["val"], args.input_size, args.preprocess_version)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    log(
        "cache",
        images=len(train_x) + len(val_x),
        seconds=time.perf_counter() - start,
        megabytes=(train_x.nbytes + val_x.nbytes) / 2**20,
    )

    keras.mixed_precision.set_global_policy(policy)
    try:
        model, state = fit(args, out, split, train_x, val_x, batch_size, verbose)
    finally:
        # The artifact is served in float32: the threshold must come from float32 inference.
        keras.mixed_precision.set_global_policy("float32")
    training_data = {
        "splits": summary,
        "manifest": str(Path(args.manifest).resolve()),
        "split_file": "split.csv",
        "split_sha256": split_sha,
        "excluded_sources": sorted(args.exclude_source),
        "images_without_patient_id": "train only",
        "balance_sources": args.balance_sources,
        "input_size": args.input_size,
        "seed": args.seed,
    }
    meta = export(args, out, split, model, state, training_data)
    write_reports(out, state)
    log(
        "done",
        model_version=meta.model_version,
        threshold=meta.threshold,
        val_auroc=meta.metrics["val_auroc"],
        best_epoch=state["best_epoch"],
        epochs=state["epoch"],
        seconds=time.perf_counter() - start,
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: `python -m ml.train --manifest PATH --out DIR [options]`."""
    args = parse_args(argv)
    try:
        run(args)
    except TrainingError as exc:
        log("error", message=json.dumps(str(exc)))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
