"""Worker test fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_onnx_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny artifact with its ONNX export, as CPU workers serve it."""
    from ml.export import export_onnx

    model_dir = tmp_path_factory.mktemp("onnx-model") / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    export_onnx(model_dir)
    return model_dir
