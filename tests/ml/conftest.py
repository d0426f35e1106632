"""Helpers shared by the ml tests: tiny models and artifacts, a tiny manifest of real X-rays,
and a tiny training run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from ml.artifact import METADATA_FILE, ModelMetadata, write_artifact
from ml.model import build_resnet50
from ml.predictor import Predictor
from tests.conftest import CXR_DIR, REPO

PATIENT_NAMESPACES = ("hannover:", "nihcxr8:", "ieee8023:", "kermany:", "linked:")
# Eager train steps: tracing ResNet50's train step costs ~30 s on 2 cores, more than the
# whole tiny run; the tf.data pipeline (augmentation included) is traced either way.
TINY = ["--input-size", "32", "--batch-size", "8", "--run-eagerly", "--verbose", "2"]


def tiny_manifest(
    path: Path,
    sources: tuple[str, ...] = ("hannover-mhh", "nih-chestxray8-subset"),
    per_source: int = 12,
) -> Path:
    """Real X-rays, one per patient, per_source from each source (default: 12 COVID from
    Hannover, 12 non-COVID from NIH); images without a patient id count as their own."""
    with open(CXR_DIR / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    chosen = []
    for source in sources:
        seen: set[str] = set()
        for row in rows:
            key = row["patient_id"] or row["file"]
            if row["source"] == source and key not in seen and len(seen) < per_source:
                seen.add(key)
                chosen.append({**row, "file": str(CXR_DIR / row["file"])})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    return path


def run_train(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "ml.training.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


SIZE = (
    32  # ResNet50's minimum input: the weight count does not depend on it, build time barely does
)
ARCH = {"name": "resnet50", "input_size": SIZE, "dropout": 0.3}


def random_images() -> list[np.ndarray]:
    """Three random [0, 1] images of different shapes."""
    rng = np.random.default_rng(7)
    return [rng.random(shape, dtype=np.float32) for shape in [(40, 50), (120, 64), (32, 32)]]


def small_weights() -> list[np.ndarray]:
    """Two small weight arrays: an artifact that needs no model to write."""
    rng = np.random.default_rng(0)
    return [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)]


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return build_resnet50(input_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the real CLI once; its artifact is shared by the Predictor tests."""
    model_dir = tmp_path_factory.mktemp("dev-model")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml.model",
            "--init",
            str(model_dir),
            "--input-size",
            str(SIZE),
            "--force",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return model_dir, proc.stdout


@pytest.fixture(scope="module")
def predictor(cli_run: tuple[Path, str]) -> Predictor:
    return Predictor.load(cli_run[0])


@pytest.fixture
def small_artifact(tmp_path: Path) -> tuple[Path, ModelMetadata]:
    meta = write_artifact(
        tmp_path / "m",
        small_weights(),
        model_version="test-{sha8}",
        architecture=ARCH,
        trained=True,
    )
    return tmp_path / "m", meta


def edit_metadata(model_dir: Path, **changes: object) -> None:
    """Change fields of an artifact's metadata.json in place."""
    path = model_dir / METADATA_FILE
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
