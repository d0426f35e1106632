"""A model's input made where an image is first decoded, so that a worker need not decode it again.

The web tier decodes every upload (and the DICOM listener every object) to validate it. What
the worker then did again, decoding, preprocessing and the input gate's statistics, is about
half of a study's CPU besides the model (docs/benchmarks.md). `prepare` does it once at intake;
the worker uses the result when its key matches the model it serves, and decodes the stored
image otherwise (another model, another preprocessing, an older format): the result is the same
either way, bit for bit (tests/ml/test_prepared.py, tests/worker/test_prepared_inputs.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml.artifact import ModelMetadata
from ml.gate import STAT_NAMES, image_statistics
from ml.preprocess import preprocess_gray, to_caffe

# Bump when what decode_image returns, or what image_statistics computes, changes for the same
# file: inputs prepared by the old code then no longer match, and workers decode instead.
FORMAT = "1"


def input_key(meta: ModelMetadata) -> str:
    """What a prepared input depends on besides the image: it serves models with the same key."""
    return f"{FORMAT}:{meta.preprocess_version}:{meta.input_size}"


@dataclass(frozen=True)
class Prepared:
    """One image as the model and its gate read it: the preprocessed grey channel, (size, size)
    float32 in [0, 255], and the gate's statistics of the decoded pixels (ml.gate.STAT_NAMES)."""

    gray: np.ndarray
    statistics: np.ndarray


def prepare(pixels: np.ndarray, attributes: Mapping[str, Any] | None,
            meta: ModelMetadata) -> Prepared:
    """The model's input and the gate's statistics for one decoded image (decode_image's pixels)."""
    gray = preprocess_gray(pixels, meta.input_size, version=meta.preprocess_version)
    return Prepared(gray, image_statistics(pixels, attributes))


def encode(prepared: Prepared) -> bytes:
    """The bytes stored for a prepared input (both arrays' float32 values, grey channel first)."""
    return (np.ascontiguousarray(prepared.gray, np.float32).tobytes()
            + np.ascontiguousarray(prepared.statistics, np.float32).tobytes())


def decode(data: bytes, size: int) -> Prepared | None:
    """encode's bytes back, for a model of input `size`; None if they do not have that shape."""
    cells = size * size
    if len(data) != 4 * (cells + len(STAT_NAMES)):
        return None
    values = np.frombuffer(data, np.float32)
    return Prepared(values[:cells].reshape(size, size), values[cells:])


def model_batch(prepared: list[Prepared]) -> np.ndarray:
    """The model's input batch, as Predictor.preprocess makes it from the decoded images."""
    return to_caffe(np.stack([p.gray for p in prepared]))
