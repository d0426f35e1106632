"""Load a model artifact once and classify batches of X-rays with it, on the chosen backend."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import ModelMetadata, load_weight_arrays, read_metadata
from ml.backends import Backend, KerasBackend, OnnxBackend, resolve_backend
from ml.overlay import normalise_maps, overlay_png
from ml.preprocess import preprocess_batch

# TensorFlow is imported only by the Keras backend, inside load(): importing this module
# stays cheap, ONNX workers never load TF, and a worker loads it only after it has forked.


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image, with what is needed to reproduce it."""

    probability_covid: float
    label: str
    threshold: float
    model_version: str
    model_sha256: str
    preprocess_version: str
    inference_ms: float
    trained: bool
    heatmap_png: bytes | None = None
    backend: str = "keras"


class Predictor:
    """A loaded model artifact; build it with Predictor.load(model_dir, backend=...)."""

    def __init__(self, metadata: ModelMetadata, backend: Backend) -> None:
        self.metadata = metadata
        self.backend = backend

    @property
    def model(self) -> Any:
        """The Keras model (None on the ONNX backend)."""
        return getattr(self.backend, "model", None)

    @classmethod
    def load(cls, model_dir: str | Path, backend: str = "keras") -> Predictor:
        """Read, verify and load the model in model_dir; backend is keras, onnx or auto. Raises ArtifactError."""
        model_dir = Path(model_dir)
        meta = read_metadata(model_dir)
        name = resolve_backend(backend, model_dir, meta)
        if name == "onnx":
            engine: Backend = OnnxBackend.load(model_dir, meta)
        else:
            engine = KerasBackend.load(meta, load_weight_arrays(model_dir, meta))
        predictor = cls(meta, engine)
        # Trace/initialise now so the first real request does not pay for it.
        predictor.backend.run(
            preprocess_batch(
                [np.zeros((32, 32), np.float32)],
                size=meta.input_size,
                version=meta.preprocess_version,
            ),
            explain=False,
        )
        return predictor

    def warm_up(self, explain: bool = True) -> None:
        """Run one dummy image through every path a request will take, so none pays for tracing."""
        self.predict([np.zeros((64, 64), dtype=np.float32)], explain=explain)

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The model's input batch for 2-D [0, 1] images, with the artifact's preprocessing."""
        meta = self.metadata
        return preprocess_batch(images, size=meta.input_size, version=meta.preprocess_version)

    def predict(self, images: Sequence[np.ndarray], explain: bool = False) -> list[Prediction]:
        """Classify 2-D [0, 1] images of any size; explain=True adds a Grad-CAM overlay PNG."""
        if len(images) == 0:
            return []
        return self.predict_batch(self.preprocess(images), images, explain=explain)

    def predict_batch(
        self, batch: np.ndarray, images: Sequence[np.ndarray], explain: bool = False
    ) -> list[Prediction]:
        """Classify an already preprocessed batch; images are the originals (for overlays)."""
        meta = self.metadata
        start = time.perf_counter()
        probabilities, cams = self.backend.run(batch, explain=explain)
        per_image_ms = (time.perf_counter() - start) * 1000.0 / len(images)

        overlays: list[bytes | None] = [None] * len(images)
        if explain and cams is not None:
            heatmaps = normalise_maps(cams)
            overlays = [
                overlay_png(image, heatmap) for image, heatmap in zip(images, heatmaps, strict=True)
            ]
        # Compare as Python floats: under NumPy 2 promotion, float32 >= float would round the
        # threshold to float32 and could disagree with the probability we report.
        return [
            Prediction(
                probability_covid=float(p),
                label="covid" if float(p) >= meta.threshold else "non-covid",
                threshold=meta.threshold,
                model_version=meta.model_version,
                model_sha256=meta.weights_sha256,
                preprocess_version=meta.preprocess_version,
                inference_ms=per_image_ms,
                trained=meta.trained,
                heatmap_png=png,
                backend=self.backend.name,
            )
            for p, png in zip(probabilities, overlays, strict=True)
        ]
