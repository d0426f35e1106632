"""What a finished ml.training.train run leaves in --out besides its checkpoint.

The artifact (metadata.json + weights.npz), with the threshold chosen on validation from the
exported float16 artifact's own predictions so that it matches what is served, then
history.json and training_curves.png.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np

from ml.artifact import ModelMetadata, write_artifact
from ml.evaluation.metrics import choose_threshold
from ml.imaging import decode_image
from ml.training import data
from ml.training.checkpoints import CHECKPOINT_DIR, atomic_json


def export(
    out: Path,
    split: dict[str, list[data.Record]],
    model: keras.Model,
    state: dict,
    training_data: dict,
    *,
    arch: dict,
    preprocess_version: str,
    target_sensitivity: float,
) -> ModelMetadata:
    """Write the artifact, with the threshold chosen from the float16 artifact's val scores."""
    from sklearn.metrics import roc_auc_score

    from ml.predictor import Predictor

    weights = model.get_weights()
    common = {
        "model_version": f"{arch['name']}-cxr-{datetime.now(UTC):%Y%m%d}-{{sha8}}",
        "architecture": arch,
        "trained": True,
        "training_data": training_data,
        "preprocess_version": preprocess_version,
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
    threshold = choose_threshold(y, s, target_sensitivity)
    predicted = s >= threshold
    metrics = {
        "split": "val",
        "note": "validation: the threshold was chosen here; see ml.evaluation.evaluate for test",
        "val_images": len(val),
        "val_auroc": float(roc_auc_score(y, s)),
        "val_sensitivity": float(predicted[y == 1].mean()),
        "val_specificity": float((~predicted[y == 0]).mean()),
        "target_sensitivity": target_sensitivity,
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
    atomic_json(
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
