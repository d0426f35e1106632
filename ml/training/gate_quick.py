"""A stand-in input gate fitted in seconds on a small set: for untrained development and test models.

Fitted the real way (ml.training.gate) on the first radiographs of each label in the shared
manifest (the ones tests upload), all of ../shared/data/ood and a few of every other kind,
with a generous distance threshold: its validation set is a handful of images. A served
model's gate is fitted on the full data instead (`python -m ml.training.gate --model DIR`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ml.gate import INT8_VARIANT, gate_files
from ml.training.gate import extract, fit_gate, own_features
from ml.training.gate_data import (
    Sample,
    _badly_exposed,
    _derived,
    _document,
    _file,
    _flat,
    _noise,
    _picture_samples,
)


def _frontal(cxr_dir: Path, per_label: int, fixtures: list[Path]) -> list[Sample]:
    """The first radiographs of each label, one in 60 of the rest (every source), and fixtures."""
    with open(cxr_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = [r for label in ("covid", "normal", "pneumonia")
              for r in [r for r in rows if r["label"] == label][:per_label]]
    chosen += rows[30::60]
    out = [Sample(r["file"], "frontal", "val" if i % 4 == 3 and i >= 3 * per_label else "train",
                  r["source"], r["label"], _file(cxr_dir / r["file"])) for i, r in enumerate(chosen)]
    return out + [Sample(p.name, "frontal", "train", "fixture", "covid", _file(p)) for p in fixtures]


def _ood(ood_dir: Path) -> list[Sample]:
    with open(ood_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [Sample(r["file"], r["kind"], "train", "ood", r["kind"], _file(ood_dir / r["file"]))
            for r in rows]


def fit_quick_gate(model_dir: Path, cxr_dir: Path, ood_dir: Path, fixtures: list[Path] | None = None,
                   backend: str = "keras", own_features_size: int | None = None) -> None:
    """Fit and write gate.json + gate.npz from a small set (features cached beside model_dir);
    backend onnx-int8: the int8 variant's own gate (gate.int8.json + gate.int8.npz);
    own_features_size: the gate reads a network of its own (ml.gate_features) at that input size."""
    synthetic = [Sample(f"{kind}:{s}", kind, "train", "synthetic", kind, lambda s=s, make=make: make(s))
                 for kind, make in (("noise", _noise), ("flat", _flat), ("document", _document))
                 for s in range(12)]
    photos = _picture_samples("photo", {"train": ["astronaut", "coffee", "camera"]}, 4)
    frontal = _frontal(cxr_dir, 40, fixtures or [])
    derived = (_derived("inverted", frontal, 10, 1, lambda x, _: 1.0 - x)
               + _derived("poor_exposure", frontal, 10, 2, _badly_exposed))
    samples = frontal + _ood(ood_dir) + synthetic + photos + derived
    variant = INT8_VARIANT if backend == "onnx-int8" else ""
    cache = Path(model_dir).parent / f".{Path(model_dir).name}-gate-features{'-' + variant if variant else ''}.npz"
    data = extract(samples, Path(model_dir), cache, backend=backend)
    features = None
    if own_features_size is not None:
        features, own = own_features(Path(model_dir), samples, cache, own_features_size)
        data = {**data, "features": own}
    fit_gate(Path(model_dir), samples, data, components=16, c=1.0, distance_margin=3.0,
             variant=variant, features=features)
    info_path = Path(model_dir) / gate_files(variant)[0]
    info = json.loads(info_path.read_text())
    info["summary"]["quick"] = "small fitting set: for development and test models only"
    info_path.write_text(json.dumps(info, indent=2) + "\n")
