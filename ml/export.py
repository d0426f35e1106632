"""`python -m ml.export MODEL_DIR [--int8 --manifest CSV]`: write an ONNX export beside a Keras
artifact, checked for parity, and optionally its int8 variant (ml/training/int8.py).

The exported graph has one input (a preprocessed batch) and three outputs:
`covid_probability` (N, 1), `cam` (N, h, w), the class-activation map of
the last convolutional block (see ml/backends.py for why that is Grad-CAM
here), and `features` (N, 2048), the pooled backbone output the input gate
(ml/gate.py) scores. CPU workers serve it with ONNX Runtime, without TensorFlow.

`--int8` quantises that export for ONNX Runtime's int8 kernels (model.int8.onnx),
calibrated on training images of the manifest and measured against float32 on
validation; an existing export made from the same weights is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import (
    ArtifactError,
    load_weight_arrays,
    read_metadata,
    replaced_atomically,
    sha256_file,
)
from ml.backends import ONNX_FILE, ONNX_INFO_FILE, KerasBackend, OnnxBackend, read_onnx_info
from ml.gate import GATE_FILE
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

    with replaced_atomically(model_dir / ONNX_FILE) as tmp:
        tf2onnx.convert.from_function(graph, input_signature=spec, opset=opset, output_path=tmp)
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
    int8 = parser.add_argument_group("int8 variant (needs the images)")
    int8.add_argument("--int8", action="store_true", help="also write model.int8.onnx (+ .json)")
    int8.add_argument("--manifest", type=Path, help="manifest.csv of the images the split names")
    int8.add_argument("--split", type=Path, help="default: MODEL_DIR/split.csv")
    int8.add_argument("--ood", type=Path, help="the gate's OOD set, for its other validation "
                      "kinds (default: ood/ beside the manifest's folder, if present)")
    int8.add_argument("--calibration-images", type=int, default=256)
    int8.add_argument("--percentile", type=float, default=99.99)
    int8.add_argument("--equalise", type=float, default=0.5, help="alpha; 0 = no equalisation")
    int8.add_argument("--keep-fp32", nargs="*", default=[], help="more ONNX node names kept float32")
    args = parser.parse_args(argv)
    if args.int8 and args.manifest is None:
        parser.error("--int8 needs --manifest (calibration and parity use the images)")
    model_dir = Path(args.model_dir)
    try:
        read_onnx_info(model_dir, read_metadata(model_dir))
        fresh = not args.int8  # plain runs always re-export; --int8 reuses a valid export
    except ArtifactError:
        fresh = True
    if fresh:
        info = export_onnx(model_dir, opset=args.opset)
        print(f"wrote {model_dir / ONNX_FILE} sha256={info['sha256']}")
        print(f"parity vs Keras: {info['parity']}")
    if args.int8:
        from ml.training.int8 import export_int8
        from ml.training.quantize import Recipe

        recipe = Recipe(calibration_images=args.calibration_images, percentile=args.percentile,
                        equalise_alpha=args.equalise, keep_fp32=tuple(args.keep_fp32))
        ood = args.ood or args.manifest.resolve().parent.parent / "ood"
        info = export_int8(model_dir, args.manifest, args.split, ood, recipe)
        parity, serving = info["parity"], info["serving"]
        print(f"wrote {model_dir / info['file']} sha256={info['sha256']}")
        print(f"int8 parity vs float32 on {parity['images']} validation images: "
              + ", ".join(f"{k}={parity[k]}" for k in ("auroc_change", "label_agreement",
                                                       "abs_delta_p99", "cam_correlation_p01")))
        if parity["passed"]:
            print("passed: serves as the same model (INFERENCE_BACKEND=auto picks it on VNNI/AMX CPUs)")
        else:
            print(f"missed {parity['missed']}: a model of its own, {serving['model_version']} at "
                  f"threshold {serving['threshold']:.4f}; only INFERENCE_BACKEND=onnx-int8 serves it")
            gate_json = model_dir / GATE_FILE
            gate = json.loads(gate_json.read_text()) if gate_json.is_file() else None
            if gate is not None and gate.get("features"):
                print(f"the input gate ({gate['version']}) reads a network of its own, not the "
                      "classifier: it serves this variant as it is")
            elif gate is not None and (ood / "manifest.csv").is_file():
                # Its features are not the float32 model's: it gets an input gate of its own.
                from ml.training.gate import main as fit_gate

                fit_gate(["--model", str(model_dir), "--backend", "onnx-int8",
                          "--cxr", str(args.manifest.resolve().parent), "--ood", str(ood),
                          "--report", str(model_dir / "gate.int8.report")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
