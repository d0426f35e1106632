"""Train the COVID-19 ResNet50 classifier and write a model artifact the service can load.

Each image is decoded and preprocessed once, with the same ml.preprocess functions serving
uses, into an in-memory cache; tf.data then shuffles, augments (rotation, shift, zoom,
brightness/contrast; no flips by default) and batches it. The split is patient-disjoint.
The threshold is chosen on validation from the exported float16 artifact's own predictions,
so it matches what is served. Research use only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Must happen before TensorFlow is first imported; setdefault keeps an explicit choice.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import ml.experiments.preprocessing  # noqa: E402,F401  (registers versions 3 and 4)
from ml.artifact import ModelMetadata  # noqa: E402
from ml.experiments import add_objective_arguments, objective_from  # noqa: E402
from ml.model import architecture  # noqa: E402
from ml.training import data  # noqa: E402
from ml.training.checkpoints import CHECKPOINT_DIR, prepare_out, write_training_config  # noqa: E402
from ml.training.config import (  # noqa: E402
    TrainConfig,
    add_image_arguments,
    add_recipe_arguments,
    cli_parser,
)
from ml.training.log import TrainingError, log  # noqa: E402
from ml.training.loop import Images, fit  # noqa: E402
from ml.training.objective import PLAIN, Objective  # noqa: E402
from ml.training.outputs import export, write_reports  # noqa: E402
from ml.training.pipeline import make_split  # noqa: E402

EXAMPLES = """examples:
  # the reference run on this CPU (see docs/training.md for timings):
  python -m ml.training.train --manifest ../shared/data/cxr/manifest.csv --out models/cxr
  # GPU, ImageNet backbone from a local file (two-phase fine-tuning):
  python -m ml.training.train --manifest DATA --out models/cxr224 --input-size 224 \\
      --weights resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5
  # continue after a kill (same --out and data options; --epochs may grow):
  python -m ml.training.train --manifest DATA --out models/cxr --resume
  # leave one source out (then evaluate on all of that source's images):
  python -m ml.training.train --manifest DATA --out models/loso-hannover --exclude-source hannover-mhh
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line (see --help)."""
    p = cli_parser("python -m ml.training.train", __doc__, EXAMPLES)
    g = p.add_argument_group("data and output")
    g.add_argument(
        "--manifest",
        required=True,
        metavar="PATH",
        help="manifest CSV (file,label,patient_id,source,view; file relative to the CSV), a "
        "folder holding manifest.csv, or a folder with one subfolder per class (covid/, ...)",
    )
    g.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="artifact directory: metadata.json + weights.npz, and split.csv, history.json, "
        "training_config.json, training_curves.png, checkpoint/",
    )
    g.add_argument("--split", metavar="CSV", help="reuse this split file instead of making one")
    g.add_argument("--val-fraction", type=float, default=0.15, help="default: %(default)s")
    g.add_argument(
        "--test-fraction",
        type=float,
        default=0.15,
        help="held out for ml.evaluation.evaluate, never touched here (default: %(default)s)",
    )
    g.add_argument(
        "--exclude-label",
        action="append",
        default=[],
        metavar="LABEL",
        help="drop images with this manifest label (e.g. normal) from train and val "
        "(repeatable); test keeps them",
    )
    g.add_argument(
        "--limit", type=int, metavar="N", help="only the first N images per class (smoke tests)"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from --out/checkpoint after the last finished epoch, with the same "
        "split; weights, Adam state, learning rate and early stopping carry over",
    )
    g.add_argument(
        "--force", action="store_true", help="start over even if --out holds a model/checkpoint"
    )

    add_recipe_arguments(p)
    g = p.add_argument_group("model")
    add_image_arguments(g, default_size=128)
    g.add_argument(
        "--weights",
        metavar="FILE",
        help="a local backbone weights file (e.g. Keras' ResNet50 notop .h5, or an "
        "EfficientNet-Lite .npz from ml.training.pretrained): pretrained, two phases as "
        "--init imagenet",
    )
    g.add_argument(
        "--hflip",
        action="store_true",
        help="also flip left-right (off by default: anatomy is not symmetric)",
    )
    g.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.90,
        help="threshold = highest score reaching this sensitivity on val (default: %(default)s)",
    )
    add_objective_arguments(p)

    g = p.add_argument_group("runtime")
    g.add_argument(
        "--run-eagerly",
        action="store_true",
        help="debugging and tiny smoke runs: skip tracing the train step (~30 s on 2 cores), "
        "at a much slower step",
    )
    g.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        help="Keras progress: 1 bar, 2 a line per epoch (default: 1 on a terminal, else 2)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Objective]:
    """The typed configuration and the objective the command line asks for."""
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    try:
        return TrainConfig.from_values(values), objective_from(values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: error() exits


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AMX or AVX512-BF16; Linux's flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def run(config: TrainConfig, objective: Objective = PLAIN) -> ModelMetadata:
    """Everything main() does, raising TrainingError for user mistakes."""
    record = {**config.record(), **objective.describe()}
    out = Path(config.out)
    saved = prepare_out(record, out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    precision = config.mixed_precision
    if precision == "auto":
        precision = "fp16" if gpus else ("bf16" if cpu_has_bf16() else "off")
    policy = {"off": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}[precision]
    batch_size = config.batch_size or (64 if gpus else 32)
    verbose = config.verbose if config.verbose is not None else (1 if sys.stdout.isatty() else 2)
    keras.utils.set_random_seed(config.seed)
    log(
        "start",
        device="gpu" if gpus else "cpu",
        policy=policy,
        batch_size=batch_size,
        input_size=config.input_size,
        preprocess_version=config.preprocess_version,
        resume=config.resume,
    )

    split = make_split(config, out)
    if not config.resume:
        # Only now that the inputs are known to be usable: --force starts over.
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    split_sha = data.write_split(split, out / "split.csv")
    summary = data.split_summary(split)
    for name, s in summary.items():
        log(
            "split",
            split=name,
            images=s["images"],
            patients=s["patients"],
            covid=s["by_target"].get("covid", 0),
            sources=len(s["by_source"]),
        )
    resolved = {"batch_size": batch_size, "dtype_policy": policy, "verbose": verbose}
    write_training_config(out, record, resolved, gpus, split_sha, saved)

    start = time.perf_counter()
    try:
        train_x = data.load_gray_images(split["train"], config.input_size, config.preprocess_version)
        val_x = data.load_gray_images(split["val"], config.input_size, config.preprocess_version)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    log(
        "cache",
        images=len(train_x) + len(val_x),
        seconds=time.perf_counter() - start,
        megabytes=(train_x.nbytes + val_x.nbytes) / 2**20,
    )

    keras.mixed_precision.set_global_policy(policy)
    try:
        model, state = fit(config, Images(split, train_x, val_x), batch_size, verbose, objective)
    finally:
        # The artifact is served in float32: the threshold must come from float32 inference.
        keras.mixed_precision.set_global_policy("float32")
    training_data = {
        "splits": summary,
        "manifest": str(Path(config.manifest).resolve()),
        "split_file": "split.csv",
        "split_sha256": split_sha,
        "excluded_sources": sorted(config.exclude_source),
        "excluded_labels": sorted(config.exclude_label),
        "images_without_patient_id": "train only",
        "balance_sources": config.balance_sources,
        "backbone": config.backbone,
        "init": "file" if config.weights else config.init,
        **objective.describe(),
        "augment": config.augment,
        "input_size": config.input_size,
        "seed": config.seed,
    }
    meta = export(
        out,
        split,
        model,
        state,
        training_data,
        arch=architecture(config.input_size, backbone=config.backbone),
        preprocess_version=config.preprocess_version,
        target_sensitivity=config.target_sensitivity,
    )
    write_reports(out, state)
    log(
        "done",
        model_version=meta.model_version,
        threshold=meta.threshold,
        val_auroc=meta.metrics["val_auroc"],
        best_epoch=state["best_epoch"],
        epochs=state["epoch"],
        seconds=time.perf_counter() - start,
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: `python -m ml.training.train --manifest PATH --out DIR [options]`."""
    config, objective = parse_args(argv)
    try:
        run(config, objective)
    except TrainingError as exc:
        log("error", message=json.dumps(str(exc)))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
