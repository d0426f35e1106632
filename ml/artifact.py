"""The model artifact on disk: metadata.json plus weights.npz (no TensorFlow here)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ml.preprocess import PREPROCESS_VERSION, supported_versions

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "weights.npz"
CLASS_NAMES = ["non-covid", "covid"]
# Classifier backbones ml.model can build (architecture "name" in metadata).
ARCHITECTURES = ("resnet50", "efficientnet-lite0", "efficientnet-lite2")
WEIGHTS_DTYPES = ("float16", "float32")
DEFAULT_NOTICE = "Research use only. Not for diagnosis."

# Fixed zip timestamp: the same weights always give the same bytes, hence the same sha256
# and model_version (np.savez would stamp the current time into the archive).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class ArtifactError(Exception):
    """A model artifact is missing ("no_model") or unusable ("invalid_model")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ModelMetadata:
    """Everything about a model artifact except its weights."""

    format_version: int
    model_version: str
    class_names: list[str]
    input_size: int
    threshold: float
    weights_file: str
    weights_sha256: str
    weights_dtype: str
    preprocess_version: str
    trained: bool
    architecture: dict
    training_data: dict
    metrics: dict
    created_at: str
    notice: str = DEFAULT_NOTICE

    def to_json(self) -> dict:
        """Return a JSON-serialisable dict of all fields."""
        return asdict(self)


def _invalid(message: str) -> ArtifactError:
    return ArtifactError("invalid_model", message)


# Expected JSON type per field; bool is checked before int because bool subclasses int.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "model_version": (str,),
    "class_names": (list,),
    "input_size": (int,),
    "threshold": (int, float),
    "weights_file": (str,),
    "weights_sha256": (str,),
    "weights_dtype": (str,),
    "preprocess_version": (str,),
    "trained": (bool,),
    "architecture": (dict,),
    "training_data": (dict,),
    "metrics": (dict,),
    "created_at": (str,),
    "notice": (str,),
}


def _check_types(raw: dict[str, Any]) -> None:
    for f in fields(ModelMetadata):
        if f.name not in raw:
            if f.name == "notice":
                continue
            raise _invalid(f"metadata field {f.name!r} is missing")
        value, expected = raw[f.name], _FIELD_TYPES[f.name]
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            raise _invalid(f"metadata field {f.name!r} has the wrong type ({type(value).__name__})")


def _check_values(meta: ModelMetadata) -> None:
    if meta.format_version != FORMAT_VERSION:
        raise _invalid(f"unknown format_version {meta.format_version} (expected {FORMAT_VERSION})")
    if meta.preprocess_version not in supported_versions():
        raise _invalid(
            f"model needs preprocess_version {meta.preprocess_version!r}, "
            f"this code implements {supported_versions()}"
        )
    if meta.class_names != CLASS_NAMES:
        raise _invalid(f"class_names must be {CLASS_NAMES}, got {meta.class_names}")
    if not 0.0 <= meta.threshold <= 1.0:
        raise _invalid(f"threshold must lie in [0, 1], got {meta.threshold}")
    if meta.input_size < 32:
        raise _invalid(f"input_size must be at least 32, got {meta.input_size}")
    # A bare file name only: metadata must not point the loader outside the model dir.
    if Path(meta.weights_file).name != meta.weights_file or meta.weights_file in ("", ".", ".."):
        raise _invalid(f"weights_file must be a plain file name, got {meta.weights_file!r}")
    if meta.weights_dtype not in WEIGHTS_DTYPES:
        raise _invalid(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {meta.weights_dtype!r}")
    if len(meta.weights_sha256) != 64:
        raise _invalid("weights_sha256 must be 64 hex digits")
    arch = meta.architecture
    dropout = arch.get("dropout", 0.0)
    if (
        arch.get("name") not in ARCHITECTURES
        or arch.get("input_size") != meta.input_size
        or isinstance(dropout, bool)
        or not isinstance(dropout, int | float)
        or not 0.0 <= dropout < 1.0
    ):
        raise _invalid(f"unsupported architecture {arch} for input_size {meta.input_size}")


def read_metadata(model_dir: str | Path) -> ModelMetadata:
    """Read and validate <model_dir>/metadata.json; the weights are not touched."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise ArtifactError(
            "no_model", f"no model artifact at {Path(model_dir)} ({METADATA_FILE} missing)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise _invalid(f"{path} must hold a JSON object")
    _check_types(raw)
    known = {f.name for f in fields(ModelMetadata)}
    meta = ModelMetadata(**{k: v for k, v in raw.items() if k in known})
    _check_values(meta)
    return meta


_seen: tuple[tuple[str, int, int, int, int], ModelMetadata] | None = None


def current_metadata(model_dir: str | Path) -> ModelMetadata:
    """read_metadata, re-read only when the file changed (another file, time or size): workers
    ask before every study, and the web at every upload, so a new model needs no restart."""
    global _seen
    try:
        st = os.stat(Path(model_dir) / METADATA_FILE)  # follows models/current to its target
    except OSError:
        return read_metadata(model_dir)  # raises the artifact's own error
    stamp = (str(model_dir), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    seen = _seen
    if seen is not None and seen[0] == stamp:
        return seen[1]
    meta = read_metadata(model_dir)
    _seen = (stamp, meta)
    return meta


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weight_arrays(model_dir: str | Path, meta: ModelMetadata) -> list[np.ndarray]:
    """Verify the weights file against metadata and return its arrays (floats as float32)."""
    path = Path(model_dir) / meta.weights_file
    if not path.is_file():
        raise _invalid(f"weights file {path} is missing")
    if sha256_file(path) != meta.weights_sha256:
        raise _invalid(f"weights file {path} does not match weights_sha256 in metadata")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = sorted(npz.files)
            if keys != [f"w{i:04d}" for i in range(len(keys))]:
                raise _invalid(f"weights file {path} has unexpected keys")
            arrays = [npz[key] for key in keys]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _invalid(f"weights file {path} cannot be read: {exc}") from exc
    return [a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a for a in arrays]


def _encode_weights(weights: list[np.ndarray], dtype: str) -> bytes:
    """Return npz bytes (deflated, fixed timestamps) holding weights as w0000, w0001, ..."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, weight in enumerate(weights):
            arr = np.asarray(weight)
            if np.issubdtype(arr.dtype, np.floating):
                with np.errstate(over="ignore"):
                    cast = arr.astype(dtype)
                # float16 tops out at 65504; an overflow would silently become inf.
                if not np.array_equal(np.isfinite(cast), np.isfinite(arr)):
                    raise ValueError(
                        f"weight {i} does not fit in {dtype}; use weights_dtype='float32'"
                    )
                arr = cast
            info = zipfile.ZipInfo(f"w{i:04d}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


@contextmanager
def replaced_atomically(path: Path) -> Iterator[str]:
    """A temporary file beside `path` for a writer to fill; when the block ends without error it
    becomes `path` in one step (os.replace), otherwise it is removed: readers never see half a
    file. mkstemp makes 0600 files and workers often run as another user (containers): 0644."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(path: Path, data: bytes) -> None:
    """Write data to path through replaced_atomically, synced to disk first."""
    with replaced_atomically(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_artifact(
    model_dir: str | Path,
    weights: list[np.ndarray],
    *,
    model_version: str,
    architecture: dict,
    trained: bool,
    threshold: float = 0.5,
    training_data: dict | None = None,
    metrics: dict | None = None,
    weights_dtype: str = "float16",
    preprocess_version: str = PREPROCESS_VERSION,
) -> ModelMetadata:
    """Write weights then metadata into model_dir; "{sha8}" in model_version becomes the weights hash."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _encode_weights(weights, weights_dtype)
    sha = hashlib.sha256(data).hexdigest()
    meta = ModelMetadata(
        format_version=FORMAT_VERSION,
        model_version=model_version.replace("{sha8}", sha[:8]),
        class_names=list(CLASS_NAMES),
        input_size=int(architecture["input_size"]),
        threshold=float(threshold),
        weights_file=WEIGHTS_FILE,
        weights_sha256=sha,
        weights_dtype=weights_dtype,
        preprocess_version=preprocess_version,
        trained=trained,
        architecture=dict(architecture),
        training_data=dict(training_data or {}),
        metrics=dict(metrics or {}),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    try:
        _check_values(meta)
    except ArtifactError as exc:
        raise ValueError(exc.message) from None
    # Weights first: metadata is what marks the artifact present, so it goes last.
    _atomic_write(out / WEIGHTS_FILE, data)
    text = json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n"
    _atomic_write(out / METADATA_FILE, text.encode("utf-8"))
    return meta
