"""Static int8 quantisation of an ONNX export with ONNX Runtime (called by `python -m ml.export DIR --int8`).

The float32 export is first simplified (`quant_pre_process`: batch normalisation
folded into the convolutions), then its Conv -> Relu -> Conv pairs are
equalised: channel i of the first convolution is divided by s_i and the second
convolution's input channel i multiplied by it, which leaves the float function
unchanged (ReLU commutes with a positive scale) but narrows the spread of
per-channel activation ranges that a single per-tensor int8 scale must cover
(inside the shipped ResNet50's bottlenecks half the channels peak below 1/40 of
the widest one). Activation ranges are then calibrated on training images from
histograms, a chunk of images at a time so memory stays bounded, clipped at a
percentile; weights are int8 per channel, activations uint8 (the u8s8 kernels
VNNI and AMX run). The first convolution, the classifier head and the CAM's
matrix product stay float32, and nothing after the last Relu is quantised, so
`features` and `cam` are float32 reads of the last block.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Op types quantised: Relu and the stem's Pad/MaxPool only fuse into the int8 convolutions
# around them. Not Squeeze/Reshape/Transpose: on this graph they carry `features` and the
# CAM, which must stay float32 (quantising them cost the gate's features 8-bit resolution).
OP_TYPES = ("Conv", "Relu", "MaxPool", "Pad")
OUTPUT_NAMES = ("covid_probability", "cam", "features")


@dataclass(frozen=True)
class Recipe:
    """How an int8 variant is made; recorded in its json."""

    calibration_images: int = 256
    percentile: float = 99.99
    histogram_bins: int = 2048
    equalise_alpha: float = 0.5  # 0 turns equalisation off; 1 equalises activation ranges fully
    equalise_images: int = 64
    chunk: int = 8  # images per calibration run: bounds memory (all activations of a chunk)
    keep_fp32: tuple[str, ...] = field(default=())  # node names kept float32 besides the defaults
    op_types: tuple[str, ...] = OP_TYPES

    def to_json(self) -> dict[str, Any]:
        """The recipe as JSON."""
        return {"calibration_images": self.calibration_images, "method": "percentile",
                "percentile": self.percentile, "histogram_bins": self.histogram_bins,
                "equalise_alpha": self.equalise_alpha, "equalise_images": self.equalise_images,
                "chunk": self.chunk, "keep_fp32_extra": list(self.keep_fp32),
                "op_types": list(self.op_types), "weights": "int8 per channel",
                "activations": "uint8 per tensor"}


Batches = Callable[[], Iterator[np.ndarray]]  # a fresh pass over the calibration images, in chunks


def _nodes(model: Any) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers, {i.name: i for i in model.graph.initializer}


def default_fp32_nodes(model: Any) -> list[str]:
    """Nodes kept float32: the first convolution and every MatMul/Gemm (the head and the CAM)."""
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    heads = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    return convs[:1] + heads


def equalisable_pairs(model: Any) -> list[tuple[Any, Any, Any]]:
    """(conv_a, relu, conv_b): conv_a's output feeds only the Relu, whose output feeds only conv_b."""
    consumers, inits = _nodes(model)
    pairs = []
    for a in model.graph.node:
        if a.op_type != "Conv" or len(a.input) < 3 or a.input[1] not in inits or a.input[2] not in inits:
            continue
        after_a = consumers.get(a.output[0], [])
        if len(after_a) != 1 or after_a[0].op_type != "Relu":
            continue
        relu = after_a[0]
        after_relu = consumers.get(relu.output[0], [])
        if len(after_relu) != 1 or after_relu[0].op_type != "Conv":
            continue
        b = after_relu[0]
        grouped = any(attr.name == "group" and attr.i != 1 for attr in b.attribute)
        if not grouped and b.input[1] in inits and b.input[0] == relu.output[0]:
            pairs.append((a, relu, b))
    return pairs


def _session(model_or_path: Any, optimise: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimise
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def channel_peaks(model: Any, tensors: Sequence[str], batches: Batches, limit: int) -> dict[str, np.ndarray]:
    """Per-channel maximum of NCHW tensors over the first `limit` calibration images."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session, input_name = _session(probe), model.graph.input[0].name
    peaks: dict[str, np.ndarray] = {}
    seen = 0
    for batch in batches():
        for name, value in zip(tensors, session.run(list(tensors), {input_name: batch}), strict=True):
            peak = value.max(axis=(0, 2, 3))
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
        seen += len(batch)
        if seen >= limit:
            break
    return peaks


def equalise(model: Any, batches: Batches, alpha: float, images: int) -> int:
    """Rescale every equalisable Conv -> Relu -> Conv pair in place; returns how many pairs."""
    from onnx import numpy_helper

    pairs = equalisable_pairs(model)
    if alpha <= 0 or not pairs:
        return 0
    peaks = channel_peaks(model, [relu.output[0] for _, relu, _ in pairs], batches, images)
    _, inits = _nodes(model)

    def read(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).astype(np.float64)

    def write(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    for a, relu, b in pairs:
        peak = peaks[relu.output[0]].astype(np.float64)
        scale = np.clip(peak / max(float(peak.max()), 1e-12), 1e-3, 1.0) ** alpha
        write(a.input[1], read(a.input[1]) / scale[:, None, None, None])
        write(a.input[2], read(a.input[2]) / scale)
        write(b.input[1], read(b.input[1]) * scale[None, :, None, None])
    return len(pairs)


def calibrate(model_path: Path, batches: Batches, recipe: Recipe, work: Path) -> Any:
    """Percentile ranges of every tensor the quantiser needs, from histograms filled chunk by chunk."""
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        HistogramCalibrater,
        HistogramCollector,
        TensorsData,
    )

    augmenter = HistogramCalibrater(model_path, list(recipe.op_types), str(work / "augmented.onnx"),
                                    method="percentile", symmetric=False,
                                    num_bins=recipe.histogram_bins, percentile=recipe.percentile)
    augmenter.augment_graph()
    session = _session(str(work / "augmented.onnx"))
    names = [o.name for o in session.get_outputs()]
    wanted = augmenter.tensors_to_calibrate
    collector = HistogramCollector("percentile", False, recipe.histogram_bins, 128,
                                   recipe.percentile, "same")
    input_name = session.get_inputs()[0].name
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per chunk
        for batch in batches():
            outputs = session.run(None, {input_name: batch})
            collector.collect({n: v for n, v in zip(names, outputs, strict=True) if n in wanted})
        ranges = collector.compute_collection_result()
    return TensorsData(CalibrationMethod.Percentile, ranges)


def quantise(fp32_path: Path, out_path: Path, batches: Batches, recipe: Recipe) -> dict[str, Any]:
    """Write the int8 model to out_path; returns what was done (pairs equalised, nodes kept float32)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        work = Path(tmp)
        quant_pre_process(str(fp32_path), str(work / "folded.onnx"), skip_symbolic_shape=True)
        model = onnx.load(str(work / "folded.onnx"))
        pairs = equalise(model, batches, recipe.equalise_alpha, recipe.equalise_images)
        onnx.save(model, str(work / "equalised.onnx"))
        keep = default_fp32_nodes(model) + list(recipe.keep_fp32)
        ranges = calibrate(work / "equalised.onnx", batches, recipe, work)
        save_tensors_data(ranges, work / "ranges.json")
        quantize_static(str(work / "equalised.onnx"), str(out_path), None,
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(recipe.op_types), nodes_to_exclude=keep,
                        calibrate_method=ranges.calibration_method,
                        calibration_cache_path=str(work / "ranges.json"))
    return {"equalised_pairs": pairs, "kept_fp32": keep}
