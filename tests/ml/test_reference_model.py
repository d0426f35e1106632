"""The reference model shipped in models/current is what the service serves by default."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ml.artifact import read_metadata
from ml.imaging import decode_image
from ml.predictor import Predictor
from tests.conftest import FIXTURES, REPO

CURRENT = REPO / "models" / "current"


def test_current_is_a_trained_compact_artifact_with_a_model_card():
    meta = read_metadata(CURRENT)
    assert meta.trained and meta.model_version.startswith("resnet50-cxr-")
    assert (CURRENT / meta.weights_file).stat().st_size <= 50 * 2**20
    assert meta.weights_dtype == "float16"
    assert 0.0 < meta.threshold < 1.0 and meta.metrics["split"] == "val"
    card = (CURRENT / "MODEL_CARD.md").read_text()
    assert "Research use only" in card and meta.model_version in card
    assert Path(CURRENT.resolve()).name == meta.model_version  # current points at a versioned folder


def test_current_model_predicts_the_licensed_fixtures():
    predictor = Predictor.load(CURRENT, backend="keras")
    images = [decode_image(p.read_bytes()).pixels for p in sorted(FIXTURES.glob("*.png"))]
    results = predictor.predict(images, explain=True)
    assert len(results) == 3
    for r in results:
        assert r.trained and 0.0 <= r.probability_covid <= 1.0 and r.gate_version
        assert (r.heatmap_png is not None) == (r.abstain_reason is None)  # no heatmap unread
    # hannover__3a81faf3, a washed-out AP portable of a test-split patient, was a wrongful
    # abstention ("inverted") until the gate's polarity model (docs/experiments/gate/, seventh
    # session): all three are frontal films, all three answered.
    assert all(r.abstain_reason is None for r in results)


def test_served_artifact_holds_only_what_serving_and_a_reader_need():
    """docker-compose mounts models/ into production: reports and experiments live in docs/."""
    version_dir = CURRENT.resolve()
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", version_dir.relative_to(REPO).as_posix()],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [f for f in listed.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = []
    if not files:  # what is on disk, less the ONNX export made at run time
        files = [p for p in version_dir.rglob("*") if p.is_file() and "model.onnx" not in p.name]
    assert len(files) <= 12, sorted(files)
    assert not (version_dir / "reports").exists()
    card = (version_dir / "MODEL_CARD.md").read_text()
    assert len(card.splitlines()) <= 150
    assert "Research use only. Not for diagnosis." in card
    assert "docs/experiments/" in card
    targets = re.findall(r"\]\(([^)#:]+)\)", card)  # relative links only
    assert targets and all((version_dir / t).exists() for t in targets), targets
    assert (REPO / "docs" / "experiments" / "README.md").is_file()
