"""An input gate for the tiny test models: ml.training.gate_quick on the shared data and fixtures."""

from __future__ import annotations

from pathlib import Path

from ml.training.gate_quick import fit_quick_gate
from tests.conftest import CXR_DIR, FIXTURES


def add_gate(model_dir: Path) -> None:
    """Fit and write gate.json + gate.npz into a tiny model's directory."""
    fit_quick_gate(model_dir, CXR_DIR, CXR_DIR.parent / "ood", sorted(FIXTURES.glob("*.png")))
