"""Train the classifier from an ml.training.pack file on any Keras 3 backend (JAX, PyTorch, TensorFlow).

For GPU hosts that have a Keras backend but not TensorFlow or the data set: the pack carries
the preprocessed images, this trains the same ResNet50 (ml.model) with the same recipe as
ml.training.train (Adam, class-weighted loss, augmentation on the fly, plateau halving of the learning
rate, early stopping on validation AUROC, best epoch kept), and writes the best epoch's
weights (float16, the artifact's precision) and its history. `python -m ml.training.package` then
makes the model artifact on a machine with the data, choosing the threshold on validation
from the artifact's own predictions exactly as ml.training.train does. Research use only.

    KERAS_BACKEND=jax python -m ml.training.portable --pack PACK.npz --out RUN_DIR
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from ml.model import architecture, build_classifier  # noqa: E402
from ml.preprocess import IMAGENET_BGR_MEAN, to_caffe  # noqa: E402
from ml.training.config import PortableConfig, add_recipe_arguments, cli_parser  # noqa: E402
from ml.training.data import (  # noqa: E402
    GAMMA,
    NOISE,
    SHARPNESS,
    STRENGTHS,
    affine_rows,
    epoch_order,
    group_balanced_probabilities,
    target_class_weights,
)
from ml.training.pack import HELDOUT, PACKED_SPLITS, Pack, read_pack  # noqa: E402
from ml.training.phases import schedule, set_phase  # noqa: E402

WEIGHTS_FILE = "classifier_weights.npz"
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"


class Augment(keras.layers.Layer):
    """ml.training.pipeline.augment in keras.ops: one random affine (rotation and zoom about the
    centre, then a shift; reflected borders), then contrast about the image mean and
    brightness, clipped to [0, 255]. Identity at inference."""

    def __init__(self, strength: str = "mild", seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.strength = strength
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, gray, training=None):
        gray = ops.cast(gray, "float32")
        if not training:
            return gray
        brightness, contrast = STRENGTHS[self.strength][3:]
        shape = ops.shape(gray)
        u = keras.random.uniform((shape[0], 6), -1.0, 1.0, seed=self.seed_generator)
        transform = affine_rows(u, float(shape[1]), float(shape[2]), self.strength, ops)
        out = ops.image.affine_transform(
            gray,
            transform,
            interpolation="bilinear",
            fill_mode="reflect",
            data_format="channels_last",
        )
        if self.strength == "strong":
            out = self._acquisition(out)
        mean = ops.mean(out, axis=(1, 2, 3), keepdims=True)
        gain = ops.reshape(1.0 + u[:, 4] * contrast, (-1, 1, 1, 1))
        offset = ops.reshape(u[:, 5] * brightness * 255.0, (-1, 1, 1, 1))
        return ops.clip((out - mean) * gain + mean + offset, 0.0, 255.0)

    def _acquisition(self, gray):
        # ml.training.pipeline._acquisition: random gamma, blur or sharpening, Gaussian noise.
        u = keras.random.uniform((ops.shape(gray)[0], 3), -1.0, 1.0, seed=self.seed_generator)
        gamma = ops.reshape(ops.exp(u[:, 0] * math.log(GAMMA)), (-1, 1, 1, 1))
        out = 255.0 * ops.power(ops.clip(gray, 0.0, 255.0) / 255.0, gamma)
        blurred = ops.average_pool(out, 3, strides=1, padding="same")
        out = out + ops.reshape(u[:, 1] * SHARPNESS, (-1, 1, 1, 1)) * (out - blurred)
        sd = ops.reshape(ops.abs(u[:, 2]) * NOISE, (-1, 1, 1, 1))
        return out + sd * keras.random.normal(ops.shape(out), seed=self.seed_generator)

    def get_config(self):
        return {**super().get_config(), "strength": self.strength, "seed": self.seed}


class ToCaffe(keras.layers.Layer):
    """ml.preprocess.to_caffe: grey to three channels less the ImageNet BGR mean."""

    def call(self, gray):
        return ops.concatenate([gray, gray, gray], axis=-1) - ops.convert_to_tensor(
            IMAGENET_BGR_MEAN, "float32"
        )


class BestAndDeadline(keras.callbacks.Callback):
    """Keep the best val AUROC epoch's classifier weights; stop on patience or time budget."""

    def __init__(
        self,
        classifier: keras.Model,
        patience: int,
        budget_s: float | None,
        clock=time.perf_counter,
    ):
        super().__init__()
        self.clock = clock
        self.classifier, self.patience, self.budget_s = classifier, patience, budget_s
        self.best, self.best_epoch, self.best_weights = -1.0, 0, None
        self.may_stop = True
        self.history: list[dict] = []
        self.stop_reason = "epochs"
        self.start = clock()
        self.epoch_start = self.start

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        now = self.clock()
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        row["lr"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["seconds"] = now - self.epoch_start
        self.history.append(row)
        if row.get("val_auc", -1.0) > self.best:
            self.best, self.best_epoch = row["val_auc"], epoch + 1
            self.best_weights = [np.array(w) for w in self.classifier.get_weights()]
        print(json.dumps({"event": "epoch", **row}), flush=True)
        if self.may_stop and epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training, self.stop_reason = True, "patience"
        elif self.budget_s is not None and now - self.start + self.next_epoch_s() > self.budget_s:
            self.model.stop_training, self.stop_reason = True, "time budget"

    def next_epoch_s(self) -> float:
        """The next epoch's expected duration: the fastest so far but the first, which also
        compiles the step (0 after one epoch: the budget then stops it only when spent)."""
        later = [h["seconds"] for h in self.history[1:]]
        return min(later) if later else 0.0


class WatchHeldout(keras.callbacks.Callback):
    """--watch-heldout: after every epoch, the held-out source's AUROC as heldout_auc in the
    logs and the history. A diagnostic of how much epoch selection could matter; nothing
    reads it to select, stop or schedule (those watch val_auc alone)."""

    def __init__(self, classifier: keras.Model, gray: np.ndarray, y: np.ndarray, batch_size: int):
        super().__init__()
        self.classifier, self.x, self.y, self.batch_size = classifier, to_caffe(gray), y, batch_size

    def on_epoch_end(self, epoch, logs=None):
        from ml.evaluation.metrics import auroc

        scores = self.classifier.predict(self.x, batch_size=self.batch_size, verbose=0)
        value = auroc(self.y, scores[:, 0])  # None if the held-out images are of one class
        if logs is not None and value is not None:
            logs["heldout_auc"] = value


class BalancedBatches(keras.utils.PyDataset):
    """--balance-sources: each epoch len(y) draws with replacement, every (source, class)
    group equally often (ml.training.data.source_balanced_probabilities), unit loss weights."""

    def __init__(self, x, y, sources, batch_size: int, seed: int):
        super().__init__()
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.p = group_balanced_probabilities(y.astype(int).tolist(), sources.tolist())
        self.epoch = 0
        self.order = epoch_order(len(y), 0, seed, self.p)

    def __len__(self):
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, i):
        idx = np.sort(self.order[i * self.batch_size : (i + 1) * self.batch_size])
        return self.x[idx], self.y[idx, None]

    def on_epoch_end(self):
        self.epoch += 1
        self.order = epoch_order(len(self.y), self.epoch, self.seed, self.p)


def accelerator() -> str | None:
    """The GPU this Keras backend computes on, or None."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return gpus[0].device_kind if gpus else None
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return gpus[0].name if gpus else None
    return None


def training_model(classifier: keras.Model, size: int, strength: str, seed: int) -> keras.Model:
    """uint8 grey (S, S, 1) -> Augment (training only) -> ToCaffe -> classifier."""
    gray = keras.Input((size, size, 1), dtype="uint8", name="gray")
    x = Augment(strength, seed=seed, dtype="float32", name="augment")(gray)
    x = ToCaffe(dtype="float32", name="to_caffe")(x)
    return keras.Model(gray, classifier(x), name="portable_training")


def exclude_sources(pack: Pack, names: list[str]) -> Pack:
    """The pack without these sources in train and val (leave-one-source-out)."""
    unknown = sorted(set(names) - set(pack.meta["sources"]))
    if unknown:
        raise ValueError(f"--exclude-source: the pack holds no source named {unknown}")
    drop = [pack.meta["sources"].index(n) for n in names]
    keep = {
        name: ~np.isin(ids, drop) if name != HELDOUT else np.ones(len(ids), bool)
        for name, ids in pack.source.items()
    }
    for name in PACKED_SPLITS:
        if len(np.unique(pack.target[name][keep[name]])) < 2:
            raise ValueError(f"without {names} the {name} split lacks COVID or non-COVID images")
    return Pack(
        {n: a[keep[n]] for n, a in pack.gray.items()},
        {n: a[keep[n]] for n, a in pack.target.items()},
        {n: a[keep[n]] for n, a in pack.source.items()},
        pack.meta,
    )


def train(pack: Pack, config: PortableConfig) -> dict:
    """Fit, write the best weights and history to config.out; return the run record."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = accelerator()
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if gpu else "off"
    policy = {"off": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[precision]
    batch_size = config.batch_size or (64 if gpu else 32)
    size = pack.meta["input_size"]
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(policy)
    arch = architecture(size, backbone=config.backbone)
    init = "imagenet" if config.init == "imagenet" else None
    classifier = build_classifier(arch, weights=init, seed=config.seed, output_dtype="float32")
    model = training_model(classifier, size, config.augment, config.seed)
    x, y = pack.gray["train"][..., None], pack.target["train"].astype(np.float32)
    weights = target_class_weights(pack.target["train"])
    val = (pack.gray["val"][..., None], pack.target["val"].astype(np.float32)[:, None])
    keeper = BestAndDeadline(classifier, config.patience, config.time_budget_s)
    plateau = keras.callbacks.ReduceLROnPlateau(
        "val_auc", mode="max", factor=0.5, patience=max(1, config.patience // 2), min_lr=1e-6
    )
    print(
        json.dumps(
            {
                "event": "start",
                "backend": keras.backend.backend(),
                "device": gpu or platform.machine(),
                "policy": policy,
                "batch_size": batch_size,
                "input_size": size,
                "train": len(y),
                "val": len(val[1]),
            }
        ),
        flush=True,
    )
    watch = []
    if config.watch_heldout:
        watch = [WatchHeldout(classifier, pack.gray[HELDOUT], pack.target[HELDOUT], batch_size)]
    if config.balance_sources:
        batches = BalancedBatches(x, y, pack.source["train"], batch_size, config.seed)
        inputs = {"x": batches}
    else:
        inputs = {"x": x, "y": y[:, None], "sample_weight": weights, "batch_size": batch_size}
    start = time.perf_counter()
    for phase, first, last, lr in schedule(config):
        if keeper.stop_reason != "epochs":  # patience or the time budget ended the run
            break
        set_phase(classifier, phase)
        keeper.may_stop = phase != "head"  # the frozen-backbone warm-up always runs in full
        model.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss="binary_crossentropy",
            metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
            jit_compile="auto",
        )
        model.fit(
            **inputs,
            epochs=last,
            initial_epoch=first,
            validation_data=val,
            callbacks=[*watch, plateau, keeper],
            shuffle=True,
            verbose=config.verbose,
        )
    seconds = time.perf_counter() - start
    if keeper.best_weights is None:
        raise RuntimeError("no epoch finished")
    classifier.set_weights(keeper.best_weights)
    heldout = score_heldout(classifier, pack, config, batch_size)
    np.savez(
        out / WEIGHTS_FILE,
        **{f"w{i:03d}": w.astype(np.float16) for i, w in enumerate(keeper.best_weights)},
    )
    # Throughput of the epochs after the first (which includes compiling the step).
    later = keeper.history[1:]
    images = len(y) + len(val[1])
    run = {
        "pack": pack.meta,
        "excluded_sources": sorted({*pack.meta["excluded_sources"], *config.exclude_source}),
        "args": config.record(),
        "resolved": {"batch_size": batch_size, "dtype_policy": policy},
        "backend": keras.backend.backend(),
        "device": gpu or platform.machine(),
        "versions": {"python": platform.python_version(), "keras": keras.__version__},
        "seconds": seconds,
        "stop_reason": keeper.stop_reason,
        "images_per_second": (
            images * len(later) / sum(h["seconds"] for h in later) if later else None
        ),
        "weights": len(keeper.best_weights),
        "heldout": heldout,
    }
    state = {
        "best_epoch": keeper.best_epoch,
        "best_val_auc": keeper.best,
        "epoch": len(keeper.history),
        "stopped_early": keeper.stop_reason != "epochs",
        "history": keeper.history,
    }
    (out / RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    (out / HISTORY_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return run


def heldout_source(pack: Pack, config: PortableConfig) -> str | None:
    """The pack's held-out source if this run left it out of training, else None."""
    source = pack.meta.get("heldout_source")
    if HELDOUT not in pack.gray or source not in {
        *pack.meta["excluded_sources"],
        *config.exclude_source,
    }:
        return None
    return source


def score_heldout(
    classifier: keras.Model, pack: Pack, config: PortableConfig, batch_size: int
) -> dict | None:
    """Screening only: AUROC of the best epoch on the pack's held-out source, if this run
    left that source out. (ml.evaluation.evaluate on the packaged artifact gives the reported figure.)"""
    source = heldout_source(pack, config)
    if source is None:
        return None
    from ml.evaluation.metrics import auroc

    scores = classifier.predict(to_caffe(pack.gray[HELDOUT]), batch_size=batch_size, verbose=0)
    y = pack.target[HELDOUT]
    result = {
        "source": source,
        "images": len(y),
        "covid": int(y.sum()),
        "auroc": auroc(y, scores[:, 0]),
    }
    print(json.dumps({"event": "heldout", **result}), flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> PortableConfig:
    """The typed configuration the command line asks for (see --help)."""
    p = cli_parser("python -m ml.training.portable", __doc__)
    p.add_argument("--pack", required=True, help="made by python -m ml.training.pack")
    p.add_argument("--out", required=True, help="run directory: weights, run.json, history.json")
    add_recipe_arguments(p)
    p.add_argument(
        "--time-budget-s",
        type=float,
        metavar="S",
        help="stop after the epoch that would leave less than one more epoch within S seconds",
    )
    p.add_argument(
        "--watch-heldout",
        action="store_true",
        help="diagnostic: score the pack's held-out source after every epoch (heldout_auc in "
        "the history); never used to select the epoch",
    )
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=2)
    try:
        return PortableConfig.from_values(vars(p.parse_args(argv)))
    except ValueError as exc:
        p.error(str(exc))
        raise  # unreachable: error() exits


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    config = parse_args(argv)
    try:
        pack = exclude_sources(read_pack(config.pack), config.exclude_source)
        if config.watch_heldout and heldout_source(pack, config) is None:
            raise ValueError(
                "--watch-heldout: the pack holds no held-out source that this run leaves out "
                "(ml.training.pack --heldout-source NAME, and --exclude-source NAME there or here)"
            )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = train(pack, config)
    print(json.dumps({"event": "done", **{k: run[k] for k in ("seconds", "stop_reason")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
