"""EfficientNet-Lite (Lite0, Lite2) as pure Keras 3 builders: backbone, ImageNet top, COVID head.

The architecture follows the official TensorFlow EfficientNet-Lite (and its PyTorch port,
efficientnet-lite-pytorch 0.1.0): MBConv blocks without squeeze-excite, ReLU6, batch-norm
epsilon 1e-3, TensorFlow "same" padding, stem (32) and head (1280) widths and the first and last
stages' depths not scaled. Layer names follow keras.applications.EfficientNet (block2a_dwconv,
top_activation, ...), so ml.training.pretrained can load converted ImageNet weights by name.

The model takes RGB in [-1, 1) as (pixel - 127) / 128, the normalisation the TensorFlow Lite
models were trained with; `normalize` / `gray_to_input` make that from [0, 255] pixels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

# Must happen before TensorFlow is first imported; setdefault keeps an explicit choice.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from ml.model import OUTPUT_LAYER  # noqa: E402
from ml.preprocess import IMAGENET_BGR_MEAN  # noqa: E402

INPUT_MEAN = 127.0
INPUT_STD = 128.0
LAST_CONV_LAYER = "top_activation"
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
STEM_FILTERS = 32
TOP_FILTERS = 1280
# (repeats, kernel, stride, expand ratio, input filters, output filters) per stage, before scaling.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# variant: (width coefficient, depth coefficient, native input size, top dropout)
VARIANTS = {"lite0": (1.0, 1.0, 224, 0.2), "lite2": (1.1, 1.2, 260, 0.3)}


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block after width/depth scaling; name is its layer-name prefix (block2a_)."""

    name: str
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def has_skip(self) -> bool:
        """Whether the block adds its input to its output (stride 1, same width)."""
        return self.stride == 1 and self.filters_in == self.filters_out


def normalize(pixels: np.ndarray) -> np.ndarray:
    """RGB (or grey) pixels in [0, 255] -> float32 (pixels - 127) / 128, the model's input."""
    return (np.asarray(pixels, dtype=np.float32) - np.float32(INPUT_MEAN)) / np.float32(INPUT_STD)


def gray_to_input(gray: np.ndarray) -> np.ndarray:
    """Grey values in [0, 255], shape (..., h, w) (ml.preprocess.preprocess_gray) -> (..., h, w, 3)."""
    return np.repeat(normalize(gray)[..., None], 3, axis=-1)


class CaffeToLite(keras.layers.Layer):
    """ml.preprocess.to_caffe's output (BGR less the ImageNet BGR mean) -> normalize()d RGB."""

    def call(self, x):
        mean = keras.ops.convert_to_tensor(IMAGENET_BGR_MEAN, dtype=x.dtype)
        rgb = keras.ops.flip(x + mean, axis=-1)
        return (rgb - INPUT_MEAN) / INPUT_STD


def _round_filters(filters: int, width: float) -> int:
    # The TensorFlow builder's rounding to multiples of 8, never more than 10% down.
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def block_specs(variant: str = "lite0") -> list[BlockSpec]:
    """The variant's MBConv blocks in order (the order of `_blocks.N` in the PyTorch port)."""
    width, depth, _, _ = _variant(variant)
    specs = []
    for stage, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(STAGES):
        fixed = stage in (0, len(STAGES) - 1)  # Lite keeps the first and last stages' depth
        f_in = STEM_FILTERS if stage == 0 else _round_filters(f_in, width)
        f_out = _round_filters(f_out, width)
        for i in range(repeats if fixed else math.ceil(depth * repeats)):
            name = f"block{stage + 1}{chr(ord('a') + i)}_"
            first = i == 0  # only the first block of a stage strides and changes width
            spec = BlockSpec(
                name, kernel, stride if first else 1, expand, f_in if first else f_out, f_out
            )
            specs.append(spec)
    return specs


def default_input_size(variant: str) -> int:
    """The resolution the variant was trained at on ImageNet (224 for Lite0, 260 for Lite2)."""
    return _variant(variant)[2]


def _variant(variant: str) -> tuple[float, float, int, float]:
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {variant!r}; one of {sorted(VARIANTS)}"
        )
    return VARIANTS[variant]


def _batch_norm(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _conv_bn(
    x: keras.KerasTensor, filters: int, kernel: int, stride: int, name: str, activation: bool = True
) -> keras.KerasTensor:
    x = keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}conv"
    )(x)
    x = _batch_norm(f"{name}bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}activation")(x) if activation else x


def _mbconv(
    x: keras.KerasTensor, spec: BlockSpec, drop_rate: float, seed: int | None
) -> keras.KerasTensor:
    p = spec.name
    inputs = x
    if spec.expand != 1:
        x = _conv_bn(x, spec.filters_in * spec.expand, 1, 1, f"{p}expand_")
    x = keras.layers.DepthwiseConv2D(
        spec.kernel, strides=spec.stride, padding="same", use_bias=False, name=f"{p}dwconv"
    )(x)
    x = _batch_norm(f"{p}bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{p}activation")(x)
    x = _conv_bn(x, spec.filters_out, 1, 1, f"{p}project_", activation=False)
    if spec.has_skip:
        if drop_rate > 0:  # stochastic depth: drop the whole residual branch per example
            x = keras.layers.Dropout(
                drop_rate, noise_shape=(None, 1, 1, 1), seed=seed, name=f"{p}drop"
            )(x)
        x = keras.layers.Add(name=f"{p}add")([x, inputs])
    return x


def _features(
    x: keras.KerasTensor, variant: str, drop_connect_rate: float, seed: int | None
) -> keras.KerasTensor:
    """Stem, MBConv blocks and top convolution: the feature map LAST_CONV_LAYER ends on."""
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem_")
    specs = block_specs(variant)
    for i, spec in enumerate(specs):
        x = _mbconv(x, spec, drop_connect_rate * i / len(specs), seed)
    return _conv_bn(x, TOP_FILTERS, 1, 1, "top_")


def build_efficientnet_lite(
    variant: str = "lite0",
    input_size: int | None = None,
    include_top: bool = False,
    pooling: str | None = None,
    drop_connect_rate: float = 0.2,
    seed: int | None = None,
    input_tensor: keras.KerasTensor | None = None,
) -> keras.Model:
    """EfficientNet-Lite backbone (random weights) taking normalize()d RGB, (size, size, 3).

    include_top adds avg_pool -> top_dropout -> predictions (1000-way softmax, ImageNet);
    otherwise pooling=None ends at LAST_CONV_LAYER's feature map and "avg" adds avg_pool.
    """
    _, _, native_size, top_dropout = _variant(variant)
    size = input_size or native_size
    inputs = (
        input_tensor if input_tensor is not None else keras.Input((size, size, 3), name="image")
    )
    x = _features(inputs, variant, drop_connect_rate, seed)
    if include_top or pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling is not None:
        raise ValueError(f"pooling must be None or 'avg', not {pooling!r}")
    if include_top:
        x = keras.layers.Dropout(top_dropout, seed=seed, name="top_dropout")(x)
        x = keras.layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=f"efficientnet_{variant}")


def build_efficientnet_lite_classifier(
    variant: str = "lite0",
    input_size: int | None = None,
    weights: str | Path | None = None,
    dropout: float = 0.3,
    seed: int | None = None,
    output_dtype: str | None = None,
    cache_dir: str | Path | None = None,
) -> keras.Model:
    """EfficientNet-Lite (average pooling) -> Dropout -> Dense(1, sigmoid), like build_resnet50,
    taking the same caffe input (BGR less the ImageNet mean) as build_resnet50.

    weights: None (random), "imagenet" (converted from the installed PyTorch weight package,
    cached in cache_dir) or the path of an .npz written by ml.training.pretrained.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    size = input_size or default_input_size(variant)
    inputs = keras.Input(shape=(size, size, 3), name="image")
    # The service feeds every classifier ml.preprocess's caffe batch; the conversion to this
    # backbone's own normalisation is part of the model (and so of its ONNX export).
    normalised = CaffeToLite(name="caffe_to_lite")(inputs)
    # Every backbone layer in the one graph (no nested model), so Grad-CAM reaches
    # LAST_CONV_LAYER with a plain model.get_layer(...), as with ResNet50.
    features = _features(normalised, variant, 0.2, seed)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(pooled)
    outputs = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_LAYER, dtype=output_dtype)(x)
    model = keras.Model(inputs, outputs, name=f"covid_efficientnet_{variant}")
    if weights is not None:
        from ml.training import pretrained  # lazy: only needed when weights are asked for

        path = (
            pretrained.imagenet_weights(variant, cache_dir)
            if weights == "imagenet"
            else Path(weights)
        )
        pretrained.load_converted(model, path, new_layers=(OUTPUT_LAYER,))
    return model
