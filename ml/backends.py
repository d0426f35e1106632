"""Inference backends behind Predictor: Keras/TensorFlow (GPU, or CPU fallback) and ONNX Runtime (CPU).

Both return, for a preprocessed batch, the COVID-19 probability, the pooled
backbone features (the classifier head's input, which the input gate in
ml/gate.py scores) and, on request, the class-activation map of the last
convolutional block. For this
architecture (global average pooling -> dropout -> one dense unit) Grad-CAM's
channel weights are the dense kernel divided by h*w, so after per-image
normalisation Grad-CAM and CAM are the same map: both backends compute it in
the forward pass, with no backward pass (tests/ml/test_backends.py checks it
against ml.experiments.gradcam.grad_cam).
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ml.artifact import ArtifactError, ModelMetadata, sha256_file

ONNX_FILE = "model.onnx"
ONNX_INFO_FILE = "model.onnx.json"
BACKENDS = ("keras", "onnx")
_POLICY_LOCK = threading.Lock()  # Keras' dtype policy is global while a model is built
FEATURES_LAYER = "head_dropout"  # its input is the global-average-pooled backbone output


@dataclass(frozen=True)
class Outputs:
    """One forward pass: probabilities (N,), pooled features (N, d), raw CAMs (N, h, w) or None."""

    probability: np.ndarray
    features: np.ndarray
    cam: np.ndarray | None


class Backend(Protocol):
    """What Predictor needs from an inference engine."""

    name: str

    def forward(self, batch: np.ndarray, explain: bool) -> Outputs:
        """Probabilities, pooled features and, if explain, raw CAMs."""
        ...

    def run(self, batch: np.ndarray, explain: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N,) and, if explain, raw CAMs (N, h, w)."""
        ...


@dataclass
class KerasBackend:
    """The Keras model under compiled tf.functions (one trace, any batch size)."""

    model: Any
    _forward: Any
    _forward_cam: Any
    name: str = "keras"

    @classmethod
    def load(
        cls, meta: ModelMetadata, weights: list[np.ndarray], precision: str | None = None
    ) -> KerasBackend:
        """Build the architecture and set the artifact's weights.

        precision: a Keras dtype policy; by default mixed_float16 on a GPU (tensor cores;
        variables and the sigmoid stay float32) and float32 on a CPU.
        """
        import keras
        import tensorflow as tf

        from ml.model import build_classifier, last_conv_layer

        # Take GPU memory as needed rather than all of it at start, so the CUDA
        # context and the batches share the card with whatever else runs there.
        # (RuntimeError: already initialised in this process; keep its setting.)
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            with contextlib.suppress(RuntimeError):
                tf.config.experimental.set_memory_growth(gpu, True)
        policy = precision or ("mixed_float16" if gpus else "float32")
        with _POLICY_LOCK:
            previous = keras.mixed_precision.global_policy()
            keras.mixed_precision.set_global_policy(policy)
            try:
                model = build_classifier(meta.architecture, output_dtype="float32")
            finally:
                keras.mixed_precision.set_global_policy(previous)
        try:
            model.set_weights(weights)
        except ValueError as exc:
            raise ArtifactError("invalid_model", f"weights do not fit the architecture: {exc}") from exc

        head = model.layers[-1]
        pooled = model.get_layer(FEATURES_LAYER).input
        outputs = [model.get_layer(last_conv_layer(meta.architecture)).output, pooled, model.output]
        every = keras.Model(model.inputs, outputs)
        spec = [tf.TensorSpec([None, meta.input_size, meta.input_size, 3], tf.float32)]

        @tf.function(input_signature=spec)
        def forward(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            _, features, probability = every(batch, training=False)
            return probability, tf.cast(features, tf.float32)

        @tf.function(input_signature=spec)
        def forward_cam(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            activations, features, probability = every(batch, training=False)
            kernel = tf.cast(head.kernel[:, 0], tf.float32)
            cam = tf.tensordot(tf.cast(activations, tf.float32), kernel, axes=1)
            return probability, cam, tf.cast(features, tf.float32)

        return cls(model, forward, forward_cam)

    def forward(self, batch: np.ndarray, explain: bool) -> Outputs:
        """One forward pass: probability and features, plus the CAM if explain."""
        import tensorflow as tf

        x = tf.convert_to_tensor(batch, dtype=tf.float32)
        if not explain:
            probability, features = self._forward(x)
            cam = None
        else:
            probability, cam, features = self._forward_cam(x)
            cam = np.asarray(cam, np.float32)
        return Outputs(np.asarray(probability, np.float32).reshape(-1),
                       np.asarray(features, np.float32), cam)

    def run(self, batch: np.ndarray, explain: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """One forward pass: probabilities and, if explain, CAMs."""
        out = self.forward(batch, explain)
        return out.probability, out.cam


@dataclass
class OnnxBackend:
    """An ONNX Runtime session on the export made by `python -m ml.export`."""

    session: Any
    input_name: str
    name: str = "onnx"
    model: Any = None
    has_features: bool = True

    @classmethod
    def load(cls, model_dir: Path, meta: ModelMetadata) -> OnnxBackend:
        """Open the export after checking that it was made from these exact weights."""
        info = read_onnx_info(model_dir, meta)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(
            str(model_dir / info["file"]), options, providers=["CPUExecutionProvider"]
        )
        names = {o.name for o in session.get_outputs()}
        return cls(session, session.get_inputs()[0].name, has_features="features" in names)

    def forward(self, batch: np.ndarray, explain: bool) -> Outputs:
        """One session run (ONNX Runtime releases the GIL while it computes)."""
        if not self.has_features:
            raise ArtifactError("invalid_model", "the ONNX export predates the features output; "
                                "re-run python -m ml.export")
        feeds = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        wanted = ["covid_probability", "features"] + (["cam"] if explain else [])
        result = self.session.run(wanted, feeds)
        cam = result[2].astype(np.float32) if explain else None
        return Outputs(result[0].reshape(-1).astype(np.float32), result[1].astype(np.float32), cam)

    def run(self, batch: np.ndarray, explain: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, if explain, CAMs; works on exports without the features output."""
        feeds = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        if not explain:
            (probability,) = self.session.run(["covid_probability"], feeds)
            return probability.reshape(-1).astype(np.float32), None
        probability, cam = self.session.run(["covid_probability", "cam"], feeds)
        return probability.reshape(-1).astype(np.float32), cam.astype(np.float32)


def read_onnx_info(model_dir: str | Path, meta: ModelMetadata) -> dict[str, Any]:
    """The export's description, validated against the artifact; raises ArtifactError."""
    path = Path(model_dir) / ONNX_INFO_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(
            "no_onnx_export", f"no ONNX export in {model_dir}: run python -m ml.export {model_dir}"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError("invalid_model", f"unreadable {ONNX_INFO_FILE}: {exc}") from exc
    if info.get("weights_sha256") != meta.weights_sha256:
        raise ArtifactError(
            "invalid_model", "the ONNX export was made from other weights; re-run python -m ml.export"
        )
    onnx_path = Path(model_dir) / str(info.get("file", ""))
    if onnx_path.name != info.get("file") or not onnx_path.is_file():
        raise ArtifactError("invalid_model", f"ONNX file {info.get('file')!r} is missing")
    if sha256_file(onnx_path) != info.get("sha256"):
        raise ArtifactError("invalid_model", "ONNX file does not match its recorded sha256")
    return info


def gpu_visible() -> bool:
    """Whether an NVIDIA device node exists (checked without importing TensorFlow)."""
    return Path("/dev/nvidia0").exists()


def resolve_backend(requested: str, model_dir: str | Path, meta: ModelMetadata) -> str:
    """'auto' -> ONNX Runtime on CPU hosts when a valid export exists, else Keras."""
    if requested in BACKENDS:
        return requested
    if requested != "auto":
        raise ValueError(f"backend must be auto, keras or onnx, got {requested!r}")
    if gpu_visible():
        return "keras"
    try:
        read_onnx_info(model_dir, meta)
        import onnxruntime  # noqa: F401
    except (ArtifactError, ImportError):
        return "keras"
    return "onnx"
