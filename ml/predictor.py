"""Load a model artifact once and classify batches of X-rays with it, on the chosen backend."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import ArtifactError, ModelMetadata, load_weight_arrays, read_metadata
from ml.backends import (
    Backend,
    KerasBackend,
    OnnxBackend,
    Outputs,
    check_int8_gate,
    resolve_backend,
    serving_terms,
    usable_cpus,
)
from ml.gate import GATE_FILE, INT8_VARIANT, Gate, image_statistics
from ml.overlay import normalise_maps, overlay_png
from ml.preprocess import preprocess_batch

# TensorFlow is imported only by the Keras backend, inside load(): importing this module
# stays cheap, ONNX workers never load TF, and a worker loads it only after it has forked.

log = logging.getLogger(__name__)
INDETERMINATE = "indeterminate"


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image, with what is needed to reproduce it.

    When the input gate abstains, label is "indeterminate" and abstain_reason says why; the
    probability is still computed and kept for audit, but it is not a reading.
    """

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
    abstain_reason: str | None = None
    gate_version: str | None = None  # None: the artifact has no input gate
    gate_frontal_probability: float | None = None
    gate_distance: float | None = None
    cam: np.ndarray | None = None  # (h, w) in [0, 1], peak 1: the heatmap before it is drawn


class Predictor:
    """A loaded model artifact; build it with Predictor.load(model_dir, backend=...)."""

    def __init__(self, metadata: ModelMetadata, backend: Backend, gate: Gate | None = None,
                 threshold: float | None = None, model_version: str | None = None,
                 lanes: int = 1) -> None:
        self.metadata = metadata
        self.backend = backend
        self.gate = gate
        self.lanes = lanes  # batches that may run at once (worker.batching runs one thread per lane)
        # What each prediction is labelled with and recorded as: the artifact's, except for an
        # int8 variant that failed parity, which serves as a model of its own (ml/backends.py).
        self._threshold = threshold
        self._model_version = model_version

    @property
    def threshold(self) -> float:
        """The decision threshold predictions are labelled with."""
        return self.metadata.threshold if self._threshold is None else self._threshold

    @property
    def model_version(self) -> str:
        """The version predictions are recorded under."""
        return self._model_version or self.metadata.model_version

    @property
    def model(self) -> Any:
        """The Keras model (None on the ONNX backend)."""
        return getattr(self.backend, "model", None)

    @classmethod
    def load(cls, model_dir: str | Path, backend: str = "keras", require_gate: bool = False,
             lanes: int = 1) -> Predictor:
        """Read, verify and load the model in model_dir; backend is keras, onnx, onnx-int8 or auto.

        require_gate=True refuses an artifact without an input gate (the service does);
        otherwise such a model answers every image and says so (gate_version None).
        lanes > 1 (ONNX Runtime only): that many batches may run at once, each with
        CPUs // lanes threads. On a CPU shared with decoding and database work, independent
        single-threaded runs lose far less to preemption than one run whose threads wait for
        each other (docs/benchmarks.md, drain). Keras keeps one lane and its own thread pools.
        Raises ArtifactError.
        """
        model_dir = Path(model_dir)
        meta = read_metadata(model_dir)
        # Each lane's runs share the CPUs; a gate with a network of its own runs in the lanes too.
        threads = max(1, usable_cpus() // lanes) if lanes > 1 else None
        gate = Gate.load(model_dir, meta, threads=threads or usable_cpus())
        if gate is None:
            if require_gate:
                raise ArtifactError(
                    "no_gate", f"the model in {model_dir} has no input gate ({GATE_FILE}); "
                    f"fit one with python -m ml.training.gate --model {model_dir}")
            log.warning("event=model_without_gate dir=%s: every image will be answered", model_dir)
        name = resolve_backend(backend, model_dir, meta)
        own: tuple[float, str] | None = None
        if name in ("onnx", "onnx-int8"):
            onnx_engine = OnnxBackend.load(model_dir, meta, int8=name == "onnx-int8", threads=threads)
            if gate is not None and gate.reads_classifier and not onnx_engine.has_features:
                raise ArtifactError("invalid_model", "the ONNX export has no features output for "
                                    f"the input gate; re-run python -m ml.export {model_dir}")
            threshold, version = serving_terms(meta, onnx_engine.info or {})
            own_gate = None
            # A gate with its own feature network reads nothing of the engine: it serves any.
            if name == "onnx-int8" and version != meta.model_version and (
                    gate is None or gate.reads_classifier):  # a model of its own
                own_gate = Gate.load(model_dir, meta, INT8_VARIANT, (onnx_engine.info or {}).get("sha256"))
            if own_gate is not None:
                gate = own_gate  # fitted on the variant's own features: nothing to compare
            elif name == "onnx-int8" and gate is not None and gate.reads_classifier:
                check_int8_gate(onnx_engine.info or {}, gate, model_dir)
            if version != meta.model_version:
                own = (threshold, version)
                log.warning("event=int8_own_model version=%s threshold=%.4f: its parity with "
                            "float32 failed, so it serves under its own version", version, threshold)
            engine: Backend = onnx_engine
        else:
            engine = KerasBackend.load(meta, load_weight_arrays(model_dir, meta))
            lanes = 1
        predictor = cls(meta, engine, gate, *(own or (None, None)), lanes=max(1, lanes))
        # Trace/initialise now so the first real request does not pay for it.
        predictor.forward(  # the gate's own network too, if it has one
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

    def predict(self, images: Sequence[np.ndarray], explain: bool = False,
                attributes: Sequence[Mapping[str, Any] | None] | None = None) -> list[Prediction]:
        """Classify 2-D [0, 1] images of any size; explain=True adds a Grad-CAM overlay PNG.

        attributes: per image, DecodedImage.attributes (DICOM tags, colourfulness) for the gate.
        """
        if len(images) == 0:
            return []
        return self.predict_batch(self.preprocess(images), images, explain=explain,
                                  attributes=attributes)

    def predict_batch(
        self, batch: np.ndarray, images: Sequence[np.ndarray], explain: bool = False,
        attributes: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[Prediction]:
        """Classify an already preprocessed batch; images are the originals (for overlays and the gate)."""
        start = time.perf_counter()
        out = self.forward(batch, explain=explain)
        per_image_ms = (time.perf_counter() - start) * 1000.0 / len(images)
        return self.finish(out, images, per_image_ms, attributes, overlays=explain)

    def forward(self, batch: np.ndarray, explain: bool = False) -> Outputs:
        """The backend's forward pass; for a gate with a network of its own (ml/gate_features.py)
        its features replace the classifier's in the outputs, computed on the same batch."""
        out = self.backend.forward(batch, explain=explain)
        if self.gate is not None and self.gate.extractor is not None:
            out = Outputs(out.probability, self.gate.extractor(batch), out.cam)
        return out

    def statistics(self, image: np.ndarray,
                   attributes: Mapping[str, Any] | None = None) -> np.ndarray | None:
        """The input gate's statistics of one image (None without a gate), for finish(). The
        worker takes them right after decoding, while the image is still in the CPU's caches:
        after the forward pass it has to be read from memory again (about 0.4 ms a study)."""
        return None if self.gate is None else image_statistics(image, attributes)

    def finish(
        self, out: Outputs, images: Sequence[np.ndarray] | None, inference_ms: float,
        attributes: Sequence[Mapping[str, Any] | None] | None = None, overlays: bool = True,
        statistics: Sequence[np.ndarray | None] | None = None,
    ) -> list[Prediction]:
        """Predictions from one forward pass's outputs: the input gate, labels, heatmaps.

        Each Prediction carries its normalised CAM when the pass computed one; overlays=True
        also renders it over the image as PNG (the worker leaves that to whoever shows it).
        statistics: per image, what statistics() gave for it, if taken before; else computed here.
        images None (the inputs were prepared at intake, ml/prepared.py): then every image's
        statistics must be given, and there are no overlays.
        """
        meta = self.metadata
        threshold = self.threshold
        n = len(out.probability)
        if images is None and (overlays or statistics is None
                               or any(st is None for st in statistics)):
            raise ValueError("without the images, every image's statistics and no overlays")
        originals = [None] * n if images is None else list(images)
        attrs = list(attributes) if attributes is not None else [None] * n
        verdicts: list[Any] = [None] * n
        if self.gate is not None:
            taken = list(statistics) if statistics is not None else [None] * n
            stats = np.stack([image_statistics(i, a) if st is None else st
                              for i, a, st in zip(originals, attrs, taken, strict=True)])
            verdicts = self.gate.assess(out.features, stats, attrs)
        heatmaps: list[np.ndarray | None] = [None] * n
        if out.cam is not None:
            heatmaps = list(normalise_maps(out.cam))
        pngs = [
            overlay_png(image, heatmap) if overlays and heatmap is not None else None
            for image, heatmap in zip(originals, heatmaps, strict=True)
        ]
        # Compare as Python floats: under NumPy 2 promotion, float32 >= float would round the
        # threshold to float32 and could disagree with the probability we report.
        return [
            Prediction(
                probability_covid=float(p),
                label=INDETERMINATE if v is not None and v.reason
                else "covid" if float(p) >= threshold else "non-covid",
                threshold=threshold,
                model_version=self.model_version,
                model_sha256=meta.weights_sha256,
                preprocess_version=meta.preprocess_version,
                inference_ms=inference_ms,
                trained=meta.trained,
                heatmap_png=None if v is not None and v.reason else png,
                cam=None if v is not None and v.reason else cam,
                backend=self.backend.name,
                abstain_reason=v.reason if v is not None else None,
                gate_version=v.gate_version if v is not None else None,
                gate_frontal_probability=v.frontal_probability if v is not None else None,
                gate_distance=v.distance if v is not None else None,
            )
            for p, png, cam, v in zip(out.probability, pngs, heatmaps, verdicts, strict=True)
        ]
