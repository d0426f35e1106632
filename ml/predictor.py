"""Load a model artifact once and classify batches of X-rays with it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ml.artifact import ArtifactError, ModelMetadata, load_weight_arrays, read_metadata
from ml.preprocess import PREPROCESS_VERSION, preprocess_batch

if TYPE_CHECKING:
    import keras

# TensorFlow is imported inside load(), not here: importing this module (e.g. for the
# Prediction type) stays cheap, and a worker loads TF only after it has forked.


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


class Predictor:
    """A loaded model artifact; build it with Predictor.load(model_dir)."""

    def __init__(
        self,
        metadata: ModelMetadata,
        model: keras.Model,
        forward: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        self.metadata = metadata
        self.model = model
        self._forward = forward
        self._grad_cam: Callable[[np.ndarray], np.ndarray] | None = None

    @classmethod
    def load(cls, model_dir: str | Path) -> Predictor:
        """Read, verify and build the model in model_dir; raises ArtifactError."""
        meta = read_metadata(model_dir)
        weights = load_weight_arrays(model_dir, meta)

        import tensorflow as tf

        from ml.model import build_resnet50

        arch = meta.architecture
        model = build_resnet50(
            input_size=meta.input_size, weights=None, dropout=float(arch.get("dropout", 0.3))
        )
        try:
            model.set_weights(weights)
        except ValueError as exc:
            raise ArtifactError(
                "invalid_model", f"weights do not fit the architecture: {exc}"
            ) from exc

        size = meta.input_size

        # A fixed signature with a free batch dimension: traced once, reused for any batch size.
        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def forward(batch: tf.Tensor) -> tf.Tensor:
            return model(batch, training=False)

        # Trace now so the first real request does not pay for it (and its timing stays honest).
        forward(tf.zeros([1, size, size, 3], tf.float32))
        return cls(meta, model, lambda batch: forward(tf.convert_to_tensor(batch)).numpy())

    def warm_up(self, explain: bool = True) -> None:
        """Run one dummy image through every path a request will take, so none pays for tracing."""
        self.predict([np.zeros((64, 64), dtype=np.float32)], explain=explain)

    def predict(self, images: Sequence[np.ndarray], explain: bool = False) -> list[Prediction]:
        """Classify 2-D [0, 1] images of any size; explain=True adds a Grad-CAM overlay PNG."""
        if len(images) == 0:
            return []
        meta = self.metadata
        batch = preprocess_batch(images, size=meta.input_size)
        start = time.perf_counter()
        probabilities = np.asarray(self._forward(batch), dtype=np.float32).reshape(-1)
        per_image_ms = (time.perf_counter() - start) * 1000.0 / len(images)

        overlays: list[bytes | None] = [None] * len(images)
        if explain:
            from ml.explain import make_grad_cam, overlay_png

            if self._grad_cam is None:
                self._grad_cam = make_grad_cam(self.model)
            heatmaps = self._grad_cam(batch)
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
                preprocess_version=PREPROCESS_VERSION,
                inference_ms=per_image_ms,
                trained=meta.trained,
                heatmap_png=png,
            )
            for p, png in zip(probabilities, overlays, strict=True)
        ]
