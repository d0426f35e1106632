"""COVID-19 classifier builders (ResNet50, EfficientNet-Lite) and the `--init` CLI for a dev artifact.

Every classifier takes the same input, ml.preprocess's "caffe" batch, and ends in global average
pooling -> head_dropout -> one sigmoid unit, so serving, ONNX export and the class-activation
maps are the same code for every backbone; an artifact's metadata names its backbone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Must happen before TensorFlow is first imported; setdefault keeps an explicit choice.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from ml.artifact import ARCHITECTURES, METADATA_FILE, ModelMetadata, write_artifact  # noqa: E402

LAST_CONV_LAYER = "conv5_block3_out"
OUTPUT_LAYER = "covid_probability"
BACKBONES = ARCHITECTURES
# The convolutional feature map the class-activation map is read from, per backbone.
_LAST_CONV = {
    "resnet50": LAST_CONV_LAYER,
    "efficientnet-lite0": "top_activation",
    "efficientnet-lite2": "top_activation",
}


def build_resnet50(
    input_size: int = 224,
    weights: str | None = None,
    dropout: float = 0.3,
    seed: int | None = None,
    output_dtype: str | None = None,
) -> keras.Model:
    """Build ResNet50 (no top, average pooling) -> Dropout -> Dense(1, sigmoid).

    output_dtype="float32" keeps the sigmoid in float32 under a mixed-precision policy
    (training); None follows the global dtype policy.
    """
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise FileNotFoundError(f"backbone weights file not found: {weights}")
    if seed is not None:
        # Keras 3 draws initializer seeds from the global RNGs; this also reseeds numpy/python/TF.
        keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    # input_tensor= puts every backbone layer in the outer graph (no nested Model), so
    # Grad-CAM can reach conv5_block3_out with a plain model.get_layer(...).
    backbone = keras.applications.ResNet50(
        include_top=False,
        weights=weights,  # "imagenet" downloads unless cached; a path is loaded by Keras.
        input_tensor=inputs,
        pooling="avg",
    )
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(backbone.output)
    outputs = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_LAYER, dtype=output_dtype)(x)
    return keras.Model(inputs, outputs, name="covid_resnet50")


def architecture(input_size: int, dropout: float = 0.3, backbone: str = "resnet50") -> dict:
    """Return the architecture dict stored in artifact metadata (the builder's kwargs + name)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    return {"name": backbone, "input_size": input_size, "dropout": dropout}


def last_conv_layer(arch: dict) -> str:
    """The layer whose feature map the class-activation map is computed from."""
    return _LAST_CONV[arch["name"]]


def build_classifier(
    arch: dict,
    weights: str | None = None,
    seed: int | None = None,
    output_dtype: str | None = None,
) -> keras.Model:
    """Build the classifier an architecture dict (artifact metadata) describes.

    weights: None (random), "imagenet" (ResNet50: Keras' file; EfficientNet-Lite: converted
    from the installed weight package), or a local file for that backbone.
    """
    name, size, dropout = arch["name"], arch["input_size"], float(arch.get("dropout", 0.3))
    if name == "resnet50":
        return build_resnet50(size, weights, dropout, seed, output_dtype)
    if name in BACKBONES:
        from ml.efficientnet_lite import build_efficientnet_lite_classifier

        variant = name.removeprefix("efficientnet-")
        return build_efficientnet_lite_classifier(
            variant, size, weights, dropout, seed, output_dtype
        )
    raise ValueError(f"unknown backbone {name!r}; known: {BACKBONES}")


def init_artifact(model_dir: str | Path, input_size: int = 224, seed: int = 0) -> ModelMetadata:
    """Write an UNTRAINED (random weights) development artifact to model_dir."""
    arch = architecture(input_size)
    model = build_resnet50(input_size=input_size, dropout=arch["dropout"], seed=seed)
    return write_artifact(
        model_dir,
        model.get_weights(),
        model_version="resnet50-untrained-{sha8}",
        architecture=arch,
        trained=False,
        threshold=0.5,
        training_data={"note": "untrained development model, random weights", "seed": seed},
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: `python -m ml.model --init models/dev`."""
    parser = argparse.ArgumentParser(prog="python -m ml.model", description=__doc__)
    parser.add_argument(
        "--init", metavar="MODEL_DIR", required=True, help="write an untrained dev artifact here"
    )
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing artifact")
    args = parser.parse_args(argv)
    if args.input_size < 32:
        parser.error("--input-size must be at least 32 (ResNet50 minimum)")
    if (Path(args.init) / METADATA_FILE).exists() and not args.force:
        # Guard against replacing a trained model with random weights by a stray command.
        parser.error(f"{args.init} already holds a model artifact; pass --force to overwrite")
    meta = init_artifact(args.init, input_size=args.input_size, seed=args.seed)
    print(f"wrote model artifact to {Path(args.init).resolve()}")
    print(
        f"model_version={meta.model_version} input_size={meta.input_size} sha256={meta.weights_sha256}"
    )
    print("UNTRAINED: random weights, predictions are meaningless. Development use only.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
