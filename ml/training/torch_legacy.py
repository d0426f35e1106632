"""Read a state dict saved by PyTorch's legacy (pre-zip) `torch.save` into numpy, without torch.

The legacy file is five pickles and raw bytes: a magic number, the protocol version, system
info, the state dict (tensors refer to storages by persistent id), the list of storage keys, then
each storage as an 8-byte little-endian element count followed by its raw little-endian data.
The unpickler here resolves only the handful of globals a tensor state dict needs; anything else
(os.system, builtins.eval, any class) is refused before it is looked up, so a crafted file cannot
run code. It is never a general pickle load.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a legacy torch tensor state dict, or holds something this reader refuses."""


@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    start: int  # first element of this (view of the) storage within the stored storage
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any
) -> _TensorRef:
    # Stands in for torch._utils._rebuild_tensor_v2; the bytes come after the pickle.
    if not isinstance(storage, _StorageRef):
        raise TorchFileError("tensor without a storage")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a tensor state dict needs (none when tensors=False)."""

    def __init__(self, file: IO[bytes], tensors: bool) -> None:
        super().__init__(file)
        self.tensors = tensors
        self.storages: dict[str, tuple[np.dtype, int]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.tensors:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _rebuild_tensor_v2
            if module == "torch" and name in STORAGE_DTYPES:
                return _StorageType(np.dtype(STORAGE_DTYPES[name]))
        raise TorchFileError(
            f"refusing to load global {module}.{name}: not part of a tensor state dict"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ("storage", type, key, location, numel, view) where view is None or (key, start, numel).
        if not (self.tensors and isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise TorchFileError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view = pid
        if not (
            isinstance(storage_type, _StorageType) and isinstance(key, str) and _is_count(numel)
        ):
            raise TorchFileError(f"malformed storage reference {pid!r:.80}")
        described = (storage_type.dtype, numel)
        if self.storages.setdefault(key, described) != described:
            raise TorchFileError(f"storage {key} referenced with two different types or sizes")
        if view is None:
            return _StorageRef(key, storage_type.dtype, 0, numel)
        if not (isinstance(view, tuple) and len(view) == 3 and all(map(_is_count, view[1:]))):
            raise TorchFileError(f"malformed storage view {view!r:.80}")
        if view[1] + view[2] > numel:
            raise TorchFileError(f"storage view {view[0]} reaches past the end of storage {key}")
        return _StorageRef(key, storage_type.dtype, view[1], view[2])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _load(f: IO[bytes], unpickler: _RestrictedUnpickler | None = None) -> Any:
    try:
        return (unpickler or _RestrictedUnpickler(f, tensors=False)).load()
    except TorchFileError:
        raise
    except Exception as exc:  # truncated or corrupt pickle: one readable error type
        raise TorchFileError(f"corrupt legacy torch file: {exc}") from exc


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    # Compare with the bytes left first: a forged count must not make read() allocate it.
    if n > os.fstat(f.fileno()).st_size - f.tell() or len(data := f.read(n)) != n:
        raise TorchFileError(f"truncated legacy torch file while reading {what}")
    return data


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray], name: str) -> np.ndarray:
    dims = ref.size + ref.stride
    if not (
        _is_count(ref.offset) and len(ref.size) == len(ref.stride) and all(map(_is_count, dims))
    ):
        raise TorchFileError(f"tensor {name}: malformed offset, size or stride")
    flat = storages[ref.storage.key][ref.storage.start :][: ref.storage.numel]
    if math.prod(ref.size) > len(flat):  # also refuses forged zero strides that would blow up
        raise TorchFileError(f"tensor {name} is larger than its storage")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if 0 not in ref.size and last >= len(flat):
        raise TorchFileError(f"tensor {name} reaches past the end of its storage")
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.size,
        strides=[s * itemsize for s in ref.stride],
        writeable=False,
    )
    return np.array(view)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy-format torch state dict (name -> tensor) as name -> numpy array, in file order."""
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise TorchFileError(f"{path} is a zip-format torch file, not the legacy format")
        f.seek(0)
        if _load(f) != MAGIC_NUMBER:
            raise TorchFileError(f"{path} is not a legacy torch file (bad magic number)")
        if _load(f) != PROTOCOL_VERSION:
            raise TorchFileError(f"{path}: unsupported torch protocol version")
        sys_info = _load(f)
        if not (isinstance(sys_info, dict) and sys_info.get("little_endian") is True):
            raise TorchFileError(f"{path}: only little-endian files are supported")
        unpickler = _RestrictedUnpickler(f, tensors=True)
        state = _load(f, unpickler)
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()
        ):
            raise TorchFileError(f"{path} does not hold a flat state dict of named tensors")
        keys = _load(f)
        names_only = isinstance(keys, list) and all(isinstance(k, str) for k in keys)
        if not names_only or sorted(keys) != sorted(unpickler.storages):
            raise TorchFileError(f"{path}: storage key list does not match the tensors")
        storages: dict[str, np.ndarray] = {}
        for key in keys:
            dtype, numel = unpickler.storages[key]
            count = int.from_bytes(_read_exact(f, 8, f"storage {key}"), "little")
            if count != numel:
                raise TorchFileError(
                    f"{path}: storage {key} holds {count} elements, expected {numel}"
                )
            raw = _read_exact(f, numel * dtype.itemsize, f"storage {key}")
            storages[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
        if f.read(1):
            raise TorchFileError(f"{path}: unexpected bytes after the last storage")
    return {name: _materialise(ref, storages, name) for name, ref in state.items()}
