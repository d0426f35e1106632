"""Checkpoint and resume state of ml.training.train.

In --out/checkpoint, after each epoch: last.weights.h5 (weights with Adam's state),
best.weights.h5 (best val AUROC) and state.json (history, early-stopping bookkeeping, learning
rate, dropout's random state); in --out, training_config.json records the options a resume
must match. So `--resume` continues a killed run as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ml.artifact import METADATA_FILE
from ml.training.log import TrainingError, log

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
    "exclude_label",
    "limit",
    "balance_sources",
    "objective",
    "source_adversary",
    "adversary_ramp",
    "adversary_loss",
    "group_dro",
    "distill_from",
    "distill_alpha",
    "backbone",
    "init",
)


def atomic_json(path: Path, obj: object) -> None:
    """Write obj as JSON so that a kill never leaves a half-written file."""
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
        atomic_json(self.ckpt / "state.json", st)
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


def restore_rng(model: keras.Model, state: dict) -> None:
    """Put back dropout's random state as EpochCheckpoint saved it in state.json."""
    for variable, value in zip(_rng_variables(model), state.get("rng_state", []), strict=False):
        variable.assign(np.asarray(value, dtype=variable.dtype))


def prepare_out(record: dict, out: Path) -> dict | None:
    """Return the saved config when resuming; never clobber a model by accident.

    record: the run's options (TrainConfig.record() and the objective's description)."""
    if record["resume"]:
        if not (out / CHECKPOINT_DIR / "state.json").is_file():
            raise TrainingError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}")
        saved = json.loads((out / "training_config.json").read_text())
        changed = [k for k in RESUME_MUST_MATCH if saved["args"].get(k) != record.get(k)]
        if changed:
            raise TrainingError(f"--resume with other {changed} than the checkpoint; use --force")
        return saved
    if ((out / METADATA_FILE).exists() or (out / CHECKPOINT_DIR).exists()) and not record["force"]:
        raise TrainingError(f"{out} already holds a model or checkpoint; use --resume or --force")
    return None


def write_training_config(
    out: Path,
    record: dict,
    resolved: dict,
    gpus: list,
    split_sha: str,
    saved: dict | None,
) -> None:
    """training_config.json: options, versions, device and split; --resume checks against it."""
    config = {
        "args": record,
        "resolved": resolved,
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
        },
        "device": [d.name for d in gpus] or [platform.machine()],
        "git_commit": _git_commit(),
        "seed": record["seed"],
        "split_sha256": split_sha,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if saved is not None:
        config["previous_runs"] = [*saved.pop("previous_runs", []), saved]
    atomic_json(out / "training_config.json", config)


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
