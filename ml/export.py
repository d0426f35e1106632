"""`python -m ml.export MODEL_DIR`: write an ONNX export beside a Keras artifact, checked for parity.

The exported graph has one input (a preprocessed batch) and three outputs:
`covid_probability` (N, 1), `cam` (N, h, w), the class-activation map of
the last convolutional block (see ml/backends.py for why that is Grad-CAM
here), and `features` (N, 2048), the pooled backbone output the input gate
(ml/gate.py) scores. CPU workers serve it with ONNX Runtime, without TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import load_weight_arrays, read_metadata, sha256_file
from ml.backends import ONNX_FILE, ONNX_INFO_FILE, KerasBackend, OnnxBackend
from ml.preprocess import IMAGENET_BGR_MEAN

PARITY_TOLERANCE = 1e-4


def _parity_batch(size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """Inputs in the preprocessed range: smooth random images, so activations look like real ones."""
    rng = np.random.default_rng(seed)
    low = rng.random((n, 8, 8)).astype(np.float32)
    gray = np.kron(low, np.ones((size // 8 + 1, size // 8 + 1), np.float32))[:, :size, :size] * 255
    return np.stack([gray] * 3, axis=-1) - np.asarray(IMAGENET_BGR_MEAN, np.float32)


def export_onnx(model_dir: str | Path, opset: int = 17) -> dict[str, Any]:
    """Convert the artifact's model to ONNX, verify it against Keras, and record it. Returns the info."""
    import tensorflow as tf
    import tf2onnx

    model_dir = Path(model_dir)
    meta = read_metadata(model_dir)
    keras_backend = KerasBackend.load(meta, load_weight_arrays(model_dir, meta))
    size = meta.input_size
    spec = (tf.TensorSpec([None, size, size, 3], tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def graph(image: tf.Tensor) -> dict[str, tf.Tensor]:
        probability, cam, features = keras_backend._forward_cam(image)
        return {"covid_probability": tf.identity(probability, name="covid_probability"),
                "cam": tf.identity(cam, name="cam"),
                "features": tf.identity(features, name="features")}

    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".model.", suffix=".onnx")
    os.close(fd)
    try:
        tf2onnx.convert.from_function(graph, input_signature=spec, opset=opset, output_path=tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, model_dir / ONNX_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    info: dict[str, Any] = {
        "file": ONNX_FILE,
        "sha256": sha256_file(model_dir / ONNX_FILE),
        "weights_sha256": meta.weights_sha256,
        "model_version": meta.model_version,
        "input_size": size,
        "opset": opset,
        "outputs": ["covid_probability", "cam", "features"],
        "tf2onnx_version": tf2onnx.__version__,
        "created_at": datetime.now(UTC).isoformat(),
    }
    (model_dir / ONNX_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    onnx_backend = OnnxBackend.load(model_dir, meta)
    batch = _parity_batch(size)
    keras_out = keras_backend.forward(batch, explain=True)
    onnx_out = onnx_backend.forward(batch, explain=True)
    cam_keras, cam_onnx = keras_out.cam, onnx_out.cam
    assert cam_keras is not None and cam_onnx is not None
    cam_scale = max(float(np.abs(cam_keras).max()), 1e-6)
    feature_scale = max(float(np.abs(keras_out.features).max()), 1e-6)
    info["parity"] = {
        "probability_max_abs_diff": float(np.abs(keras_out.probability - onnx_out.probability).max()),
        "cam_max_rel_diff": float(np.abs(cam_keras - cam_onnx).max() / cam_scale),
        "features_max_rel_diff": float(
            np.abs(keras_out.features - onnx_out.features).max() / feature_scale),
        "tolerance": PARITY_TOLERANCE,
    }
    checked = ("probability_max_abs_diff", "cam_max_rel_diff", "features_max_rel_diff")
    if max(info["parity"][k] for k in checked) > PARITY_TOLERANCE:
        (model_dir / ONNX_INFO_FILE).unlink()
        raise RuntimeError(f"ONNX export disagrees with Keras: {info['parity']}")
    (model_dir / ONNX_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m ml.export", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="model artifact directory (metadata.json + weights.npz)")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    info = export_onnx(args.model_dir, opset=args.opset)
    print(f"wrote {Path(args.model_dir) / ONNX_FILE} sha256={info['sha256']}")
    print(f"parity vs Keras: {info['parity']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
