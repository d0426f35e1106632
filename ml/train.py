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

from ml import data  # noqa: E402
from ml.artifact import ModelMetadata  # noqa: E402
from ml.checkpoints import CHECKPOINT_DIR, prepare_out, write_training_config  # noqa: E402
from ml.preprocess import PREPROCESS_VERSION, SUPPORTED_PREPROCESS_VERSIONS  # noqa: E402

# `name as name`: the input pipeline stays reachable as ml.train.<name>, as tests use it.
from ml.train_data import augment as augment  # noqa: E402
from ml.train_data import eval_dataset as eval_dataset  # noqa: E402
from ml.train_data import make_split  # noqa: E402
from ml.train_data import to_caffe as to_caffe  # noqa: E402
from ml.train_data import train_dataset as train_dataset  # noqa: E402
from ml.train_log import TrainingError, log  # noqa: E402
from ml.train_loop import fit  # noqa: E402
from ml.train_outputs import export, write_reports  # noqa: E402

EXAMPLES = """examples:
  # the reference run on this CPU (see docs/training.md for timings):
  python -m ml.train --manifest ../shared/data/cxr/manifest.csv --out models/cxr
  # GPU, ImageNet backbone from a local file (two-phase fine-tuning):
  python -m ml.train --manifest DATA --out models/cxr224 --input-size 224 \\
      --weights resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5
  # continue after a kill (same --out and data options; --epochs may grow):
  python -m ml.train --manifest DATA --out models/cxr --resume
  # leave one source out (then evaluate on all of that source's images):
  python -m ml.train --manifest DATA --out models/loso-hannover --exclude-source hannover-mhh
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see --help)."""
    p = argparse.ArgumentParser(
        prog="python -m ml.train",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        help="held out for ml.evaluate, never touched here (default: %(default)s)",
    )
    g.add_argument(
        "--exclude-source",
        action="append",
        default=[],
        metavar="NAME",
        help="drop this source from train and val (repeatable), for leave-one-source-out",
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

    g = p.add_argument_group("model and schedule")
    g.add_argument(
        "--input-size",
        type=int,
        default=128,
        help="model input side in pixels (default: %(default)s, to fit a CPU budget; 224 on GPU)",
    )
    g.add_argument(
        "--preprocess-version",
        default=PREPROCESS_VERSION,
        choices=SUPPORTED_PREPROCESS_VERSIONS,
        help="ml.preprocess version: 2 crops borders and equalises (default: %(default)s); "
        "experimental: 3 adds a lung-field crop, 4 equalises locally (CLAHE)",
    )
    g.add_argument(
        "--weights",
        metavar="imagenet|FILE",
        help="backbone init: random (default), 'imagenet' (Keras download or cache), or a "
        "local ResNet50 notop weights file. Pretrained weights mean two phases: "
        "--warmup-epochs with the backbone frozen, then all but BatchNorm at --lr/10",
    )
    g.add_argument(
        "--warmup-epochs",
        type=int,
        default=3,
        help="head-only epochs with pretrained weights (default: %(default)s)",
    )
    g.add_argument("--epochs", type=int, default=30, help="total epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=int, help="default: 32 on CPU, 64 on a GPU")
    g.add_argument(
        "--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)"
    )
    g.add_argument(
        "--patience",
        type=int,
        default=6,
        help="stop after this many epochs without a better val AUROC; the best epoch is "
        "exported (default: %(default)s)",
    )
    g.add_argument(
        "--balance-sources",
        action="store_true",
        help="sample every (source, class) group of train equally often, each class half the "
        "time, instead of class-weighting the loss",
    )
    g.add_argument(
        "--source-adversary",
        type=float,
        default=0.0,
        metavar="SCALE",
        help="train against a class-conditional source classifier through gradient reversal "
        "of this strength (ml.train_adversary; 0 = off, default), so that the features stop "
        "telling the collections of a class apart",
    )
    g.add_argument(
        "--adversary-loss",
        choices=("reversal", "confusion"),
        default="reversal",
        help="with --source-adversary: how the backbone answers the adversary. reversal: "
        "gradient reversal (maximise its loss; unbounded); confusion: make its output match "
        "the per-class source prior (bounded). Default: %(default)s",
    )
    g.add_argument(
        "--adversary-ramp",
        action="store_true",
        help="with --source-adversary: grow the reversal from 0 in the first epoch to SCALE "
        "(the domain-adversarial schedule), so the adversary learns before the backbone "
        "must answer it",
    )
    g.add_argument(
        "--group-dro",
        type=float,
        default=0.0,
        metavar="ETA",
        help="group DRO (ml.train_dro; 0 = off, default): minimise the loss of the worst "
        "(source, class) group of train, its weights moving at step size ETA (e.g. 0.01), "
        "instead of the class-weighted mean",
    )
    g.add_argument(
        "--augment",
        choices=sorted(data.STRENGTHS),
        default="mild",
        help="mild: small rotation, shift, zoom, brightness/contrast; strong: larger, plus "
        "gamma, blur/sharpening and noise, which vary what differs between collections; "
        "patch: a random window of 25-100%% of the image magnified to the input size, so "
        "that frames, markers and body outline are often out of view (default: %(default)s)",
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
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds split, init, order, augmentation (default: %(default)s)",
    )

    g = p.add_argument_group("runtime")
    g.add_argument(
        "--mixed-precision",
        choices=("auto", "off", "fp16", "bf16"),
        default="auto",
        help="auto: fp16 on a GPU; on a CPU, bf16 where it has AMX or AVX512-BF16, else off "
        "(float32: without those, bf16 is emulated and slower than float32). The artifact "
        "is always float32-served (default: %(default)s)",
    )
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
    args = p.parse_args(argv)
    args.exclude_label = [label.strip().lower() for label in args.exclude_label]
    if args.input_size < 32:
        p.error("--input-size must be at least 32 (ResNet50 minimum)")
    if args.epochs < 1 or args.patience < 1 or args.warmup_epochs < 0:
        p.error("--epochs and --patience must be at least 1, --warmup-epochs at least 0")
    if (args.batch_size is not None and args.batch_size < 1) or (args.limit or 1) < 1:
        p.error("--batch-size and --limit must be positive")
    if args.source_adversary < 0:
        p.error("--source-adversary must not be negative")
    if (args.adversary_ramp or args.adversary_loss != "reversal") and not args.source_adversary:
        p.error("--adversary-ramp and --adversary-loss need --source-adversary")
    if args.group_dro < 0:
        p.error("--group-dro must not be negative")
    if args.group_dro and (args.source_adversary or args.balance_sources):
        p.error("--group-dro replaces --balance-sources and --source-adversary")
    if not 0.0 < args.target_sensitivity <= 1.0:
        p.error("--target-sensitivity must lie in (0, 1]")
    return args


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AMX or AVX512-BF16; Linux's flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def run(args: argparse.Namespace) -> ModelMetadata:
    """Everything main() does, raising TrainingError for user mistakes."""
    out = Path(args.out)
    saved = prepare_out(args, out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    precision = args.mixed_precision
    if precision == "auto":
        precision = "fp16" if gpus else ("bf16" if cpu_has_bf16() else "off")
    policy = {"off": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}[precision]
    batch_size = args.batch_size or (64 if gpus else 32)
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    keras.utils.set_random_seed(args.seed)
    log(
        "start",
        device="gpu" if gpus else "cpu",
        policy=policy,
        batch_size=batch_size,
        input_size=args.input_size,
        preprocess_version=args.preprocess_version,
        resume=args.resume,
    )

    split = make_split(args, out)
    if not args.resume:
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
    write_training_config(out, args, resolved, gpus, split_sha, saved)

    start = time.perf_counter()
    try:
        train_x = data.load_gray_images(split["train"], args.input_size, args.preprocess_version)
        val_x = data.load_gray_images(split["val"], args.input_size, args.preprocess_version)
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
        model, state = fit(args, out, split, train_x, val_x, batch_size, verbose)
    finally:
        # The artifact is served in float32: the threshold must come from float32 inference.
        keras.mixed_precision.set_global_policy("float32")
    training_data = {
        "splits": summary,
        "manifest": str(Path(args.manifest).resolve()),
        "split_file": "split.csv",
        "split_sha256": split_sha,
        "excluded_sources": sorted(args.exclude_source),
        "excluded_labels": sorted(args.exclude_label),
        "images_without_patient_id": "train only",
        "balance_sources": args.balance_sources,
        "source_adversary": args.source_adversary,
        "adversary_ramp": args.adversary_ramp,
        "adversary_loss": args.adversary_loss,
        "group_dro": args.group_dro,
        "augment": args.augment,
        "input_size": args.input_size,
        "seed": args.seed,
    }
    meta = export(args, out, split, model, state, training_data)
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
    """CLI entry point: `python -m ml.train --manifest PATH --out DIR [options]`."""
    args = parse_args(argv)
    try:
        run(args)
    except TrainingError as exc:
        log("error", message=json.dumps(str(exc)))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
