"""An input gate for the tiny test models, fitted the real way (ml.training.gate) on a small set.

The tiny models are untrained and 32 px, so their gate is a stand-in: it is fitted on the
first manifest radiographs (the ones tests upload) and on a few of every non-frontal kind,
in seconds. The served model's gate is fitted on the full data (docs/experiments/gate/).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ml.training.gate import extract, fit_gate
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
from tests.conftest import CXR_DIR, FIXTURES

OOD_DIR = CXR_DIR.parent / "ood"


def _frontal(per_label: int) -> list[Sample]:
    """The first radiographs of each label (those tests upload train the gate) and some more."""
    with open(CXR_DIR / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = [r for label in ("covid", "normal", "pneumonia")
              for r in [r for r in rows if r["label"] == label][:per_label]]
    chosen += rows[::60]  # every source
    out = [Sample(r["file"], "frontal", "val" if i % 4 == 3 and i >= 3 * 40 else "train",
                  r["source"], r["label"], _file(CXR_DIR / r["file"])) for i, r in enumerate(chosen)]
    return out + [Sample(p.name, "frontal", "train", "fixture", "covid", _file(p))
                  for p in sorted(FIXTURES.glob("*.png"))]


def _ood() -> list[Sample]:
    with open(OOD_DIR / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [Sample(r["file"], r["kind"], "train", "ood", r["kind"], _file(OOD_DIR / r["file"]))
            for r in rows]


def add_gate(model_dir: Path) -> None:
    """Fit and write gate.json + gate.npz into a tiny model's directory."""
    synthetic = [Sample(f"{kind}:{s}", kind, "train", "synthetic", kind, lambda s=s, make=make: make(s))
                 for kind, make in (("noise", _noise), ("flat", _flat), ("document", _document))
                 for s in range(12)]
    photos = _picture_samples("photo", {"train": ["astronaut", "coffee", "camera"]}, 4)
    frontal = _frontal(40)
    derived = (_derived("inverted", frontal, 10, 1, lambda x, _: 1.0 - x)
               + _derived("poor_exposure", frontal, 10, 2, _badly_exposed))
    samples = frontal + _ood() + synthetic + photos + derived
    data = extract(samples, model_dir, model_dir.parent / "gate-features.npz", backend="keras")
    fit_gate(model_dir, samples, data, components=16, c=1.0, distance_margin=3.0)
