"""current_metadata, asked before every study and at every upload: cheap while nothing changed, never stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ml.artifact import METADATA_FILE, ArtifactError, current_metadata


def _with_version(src: Path, dst: Path, version: str) -> Path:
    shutil.copytree(src, dst)
    path = dst / METADATA_FILE
    meta = json.loads(path.read_text())
    meta["model_version"] = version
    path.write_text(json.dumps(meta))
    return dst


def test_metadata_is_reread_only_when_the_file_changes(tiny_model_dir: Path, tmp_path: Path):
    a = _with_version(tiny_model_dir, tmp_path / "a", "model-a")
    b = _with_version(tiny_model_dir, tmp_path / "b", "model-b")
    current = tmp_path / "current"
    current.symlink_to(a)

    first = current_metadata(current)
    assert first.model_version == "model-a"
    assert current_metadata(current) is first  # unchanged: not read again

    current.unlink()
    current.symlink_to(b)  # a new model installed the usual way
    assert current_metadata(current).model_version == "model-b"

    path = b / METADATA_FILE
    meta = json.loads(path.read_text())
    meta["model_version"] = "model-b2"
    path.write_text(json.dumps(meta))  # edited in place
    assert current_metadata(current).model_version == "model-b2"

    path.unlink()
    with pytest.raises(ArtifactError) as caught:
        current_metadata(current)
    assert caught.value.code == "no_model"
