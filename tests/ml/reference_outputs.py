"""The shipped model's outputs on the licensed fixtures, stored so a refactor can prove it changed nothing.

Regenerate (only when the shipped model or its preprocessing changes on purpose):
    .venv/bin/python -m tests.ml.reference_outputs
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from ml.imaging import decode_image
from ml.predictor import Predictor

REPO = Path(__file__).resolve().parents[2]
CURRENT = REPO / "models" / "current"
FIXTURES = REPO / "tests" / "fixtures"
STORED = FIXTURES / "reference_outputs.json"
# Float32 convolutions may round differently on another instruction set (oneDNN picks its
# kernels by CPU), so outputs are compared bit for bit only on a CPU with the same flags.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def isa() -> list[str]:
    """The instruction-set flags among ISA_FLAGS that this CPU has (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}
    return [f for f in ISA_FLAGS if f in flags]


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def compute() -> dict:
    """Preprocessed inputs, probabilities and raw CAMs of models/current (Keras) on the fixtures."""
    predictor = Predictor.load(CURRENT, backend="keras")
    paths = sorted(FIXTURES.glob("*.png"))
    images = [decode_image(p.read_bytes()).pixels for p in paths]
    batch = predictor.preprocess(images)
    probabilities, cams = predictor.backend.run(batch, explain=True)
    return {
        "model_version": predictor.metadata.model_version,
        "isa": isa(),
        "images": [
            {
                "file": p.name,
                "input_sha256": _sha(batch[i]),
                "probability": float(probabilities[i]),
                "cam_sha256": _sha(cams[i]),
                "cam_sum": float(np.asarray(cams[i], np.float64).sum()),
            }
            for i, p in enumerate(paths)
        ],
    }


if __name__ == "__main__":
    STORED.write_text(json.dumps(compute(), indent=2) + "\n")
    print(f"wrote {STORED}")
    sys.exit(0)
