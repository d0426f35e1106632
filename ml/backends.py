"""Inference backends behind Predictor: Keras/TensorFlow (GPU, or CPU fallback) and ONNX Runtime (CPU),
the latter on the float32 export or on its int8 quantisation (`onnx-int8`).

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
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ml.artifact import ArtifactError, ModelMetadata, sha256_file
from ml.gate import GATE_FILE

ONNX_FILE = "model.onnx"
ONNX_INFO_FILE = "model.onnx.json"
INT8_FILE = "model.int8.onnx"  # written by `python -m ml.export DIR --int8` (ml/training/quantize.py)
INT8_INFO_FILE = "model.int8.onnx.json"
BACKENDS = ("keras", "onnx", "onnx-int8")
# CPU flags (/proc/cpuinfo) with int8 dot-product instructions: only there does ONNX Runtime's
# int8 path run clearly faster than float32 (without them it can even be slower).
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")
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
    info: dict[str, Any] | None = None  # the export's json (parity, serving threshold)

    @classmethod
    def load(cls, model_dir: Path, meta: ModelMetadata, int8: bool = False,
             threads: int | None = None) -> OnnxBackend:
        """Open the export (int8: its quantised variant) after checking it was made from these weights.

        threads: CPU threads one run may use (default: ONNX Runtime's, one per core). A worker
        that runs several batches at once gives each its share (Predictor.load's lanes).
        """
        info = read_onnx_info(model_dir, meta, INT8_INFO_FILE if int8 else ONNX_INFO_FILE)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = max(1, threads)
        session = ort.InferenceSession(
            str(model_dir / info["file"]), options, providers=["CPUExecutionProvider"]
        )
        names = {o.name for o in session.get_outputs()}
        return cls(session, session.get_inputs()[0].name, name="onnx-int8" if int8 else "onnx",
                    has_features="features" in names, info=info)

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


def read_onnx_info(model_dir: str | Path, meta: ModelMetadata,
                   info_file: str = ONNX_INFO_FILE) -> dict[str, Any]:
    """An export's description (float32, or int8 with INT8_INFO_FILE), validated against the
    artifact; raises ArtifactError."""
    path = Path(model_dir) / info_file
    how = f"python -m ml.export {model_dir}" + (" --int8 --manifest MANIFEST"
                                                 if info_file == INT8_INFO_FILE else "")
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError as exc:
        code = "no_int8_export" if info_file == INT8_INFO_FILE else "no_onnx_export"
        raise ArtifactError(code, f"no {info_file} in {model_dir}: run {how}") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError("invalid_model", f"unreadable {info_file}: {exc}") from exc
    if info.get("weights_sha256") != meta.weights_sha256:
        raise ArtifactError("invalid_model", f"{info_file} was made from other weights; re-run {how}")
    onnx_path = Path(model_dir) / str(info.get("file", ""))
    if onnx_path.name != info.get("file") or not onnx_path.is_file():
        raise ArtifactError("invalid_model", f"ONNX file {info.get('file')!r} is missing")
    if sha256_file(onnx_path) != info.get("sha256"):
        raise ArtifactError("invalid_model", "ONNX file does not match its recorded sha256")
    return info


def serving_terms(meta: ModelMetadata, info: dict[str, Any]) -> tuple[float, str]:
    """(threshold, model_version) an export serves under; raises ArtifactError.

    The artifact's own, unless the export says otherwise: an int8 export whose parity with
    float32 failed is a model of its own, with a threshold chosen on validation for it and a
    version of its own ("<version>+int8"), so its probabilities never join the float32
    model's series. One that passed keeps the artifact's.
    """
    serving = info.get("serving")
    if serving is None:
        return meta.threshold, meta.model_version
    threshold, version = serving.get("threshold"), serving.get("model_version")
    passed = (info.get("parity") or {}).get("passed") is True
    if (isinstance(threshold, bool) or not isinstance(threshold, int | float)
            or not 0.0 <= threshold <= 1.0 or not isinstance(version, str)
            or not version.startswith(meta.model_version)
            or (not passed and version == meta.model_version)):
        raise ArtifactError("invalid_model", f"the export's serving terms are unusable: {serving}")
    return float(threshold), version


def check_int8_gate(info: dict[str, Any], gate: Any, model_dir: str | Path) -> None:
    """Refuse an int8 variant whose features change the input gate's validation decisions.

    The gate reads the pooled features; if int8 moves them enough to change what it
    lets through, it would abstain on good images or pass bad ones, and no threshold
    of the variant's own can say which (docs/benchmarks.md, int8). Raises ArtifactError.
    """
    measured = (info.get("parity") or {}).get("gate")
    if not measured or measured.get("gate_version") != gate.version:
        raise ArtifactError("int8_gate_unmeasured", "the int8 variant was not measured with this "
                            f"input gate; re-run python -m ml.export {model_dir} --int8 --manifest CSV")
    if measured.get("changed", 1) > 0:
        raise ArtifactError("int8_changes_gate", f"on int8 features the input gate changes "
                            f"{measured.get('changed')} of its {measured.get('images')} validation "
                            "decisions; serve this model in float32 (INFERENCE_BACKEND=onnx or auto), "
                            "or fit the variant a gate of its own: python -m ml.training.gate "
                            f"--model {model_dir} --backend onnx-int8")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def gpu_visible() -> bool:
    """Whether an NVIDIA device node exists (checked without importing TensorFlow)."""
    return Path("/dev/nvidia0").exists()


def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The first CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty if unknown."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def int8_pays(flags: frozenset[str]) -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX)."""
    return any(flag in flags for flag in INT8_CPU_FLAGS)


def int8_ready(model_dir: str | Path, meta: ModelMetadata) -> bool:
    """Whether the artifact has a valid int8 export whose parity with float32 passed at export,
    measured with the artifact's current input gate."""
    try:
        info = read_onnx_info(model_dir, meta, INT8_INFO_FILE)
    except ArtifactError:
        return False
    parity = info.get("parity") or {}
    if parity.get("passed") is not True:
        return False
    gate_path = Path(model_dir) / GATE_FILE
    if not gate_path.is_file():
        return True
    try:  # a gate refitted since the variant was measured makes that measurement stale
        version = json.loads(gate_path.read_text()).get("version")
    except (OSError, ValueError):
        return False
    return version is not None and (parity.get("gate") or {}).get("gate_version") == version


def resolve_backend(requested: str, model_dir: str | Path, meta: ModelMetadata,
                    flags: frozenset[str] | None = None) -> str:
    """'auto' -> Keras where a GPU is visible; else ONNX Runtime int8 where the CPU has VNNI/AMX
    and the int8 export passed parity, else ONNX Runtime float32 if exported, else Keras.

    flags: the CPU's flags (default: read from /proc/cpuinfo).
    """
    if requested in BACKENDS:
        return requested
    if requested != "auto":
        raise ValueError(f"backend must be auto, {', '.join(BACKENDS)}; got {requested!r}")
    if gpu_visible():
        return "keras"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "keras"
    if int8_pays(cpu_flags() if flags is None else flags) and int8_ready(model_dir, meta):
        return "onnx-int8"
    try:
        read_onnx_info(model_dir, meta)
    except ArtifactError:
        return "keras"
    return "onnx"
