"""Evaluate a model artifact on held-out X-rays, beside the thumbnail shortcut baseline.

    python -m ml.evaluation.evaluate --model DIR --manifest CSV --split SPLIT.csv --out REPORT_DIR
    python -m ml.evaluation.evaluate --model DIR --manifest CSV --leave-one-source-out SOURCE --out REPORT_DIR

The decision threshold is the artifact's (chosen on validation data at training
time); nothing here is ever tuned on the images being evaluated. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ml.artifact import read_metadata, sha256_file
from ml.evaluation.baseline import (
    DEFAULT_C,
    ThumbnailBaseline,
    ThumbnailCache,
    source_predictability,
)
from ml.evaluation.metrics import bootstrap_auroc_difference, calibration
from ml.evaluation.report import render_markdown, write_plots, write_predictions
from ml.evaluation.stats import baseline_threshold, breakdown, group_ids, summarise, within_source
from ml.imaging import decode_image
from ml.training.data import Record, load_manifest, read_split

# The bar for a held-out source: the model must reach this AUROC and beat the baseline by this.
TARGET_HELD_OUT_AUROC = 0.80
TARGET_MARGIN_OVER_BASELINE = 0.15
DEFAULT_TARGET_SENSITIVITY = 0.90
MODEL_SPLIT_FILE = "split.csv"  # written by ml.training.train next to the artifact
CI_NOTE = (
    "95% percentile bootstrap intervals, resampling patients (images without a patient id "
    "count as their own patient). They cover sampling noise on these images only, not a shift "
    "to another hospital, and an image-level bootstrap would be narrower still (too optimistic)."
)


def score_with_model(
    predictor, records: Sequence[Record], batch_size: int, cache: ThumbnailCache
) -> np.ndarray:
    """P(COVID) for each record; each file is decoded once and its thumbnail kept for the baseline."""
    threshold = predictor.metadata.threshold
    scores: list[float] = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        pixels = []
        for record in batch:
            image = decode_image(Path(record.path).read_bytes())
            cache.put(Path(record.path), image.pixels)
            pixels.append(image.pixels)
        predictions = predictor.predict(pixels, explain=False)
        # The predictor labels with the artifact's threshold; it must be the one we report with.
        assert all(p.threshold == threshold for p in predictions)
        scores.extend(p.probability_covid for p in predictions)
    return np.asarray(scores, dtype=np.float64)


def _target_sensitivity(training_data: dict, metrics: dict) -> float:
    for source in (metrics, training_data):
        value = source.get("target_sensitivity")
        if isinstance(value, int | float) and 0.0 < value <= 1.0:
            return float(value)
    return DEFAULT_TARGET_SENSITIVITY


def model_training_overlap(
    model_dir: Path, records: Sequence[Record], evaluated: Sequence[Record]
) -> dict:
    """Compare the evaluated images with the split.csv that ml.training.train leaves in the model directory.

    Returns counts of evaluated images and patients the model trained on (train) or tuned on
    (val); "checked" is False when the model directory holds no readable split.
    """
    path = Path(model_dir) / MODEL_SPLIT_FILE
    if not path.is_file():
        return {"checked": False, "reason": f"no {MODEL_SPLIT_FILE} in the model directory"}
    try:
        model_split = read_split(path, records)
    except ValueError as exc:
        return {"checked": False, "reason": f"{MODEL_SPLIT_FILE} does not fit the manifest: {exc}"}
    result: dict = {"checked": True, "model_split_sha256": sha256_file(path)}
    for name in ("train", "val"):
        keys = {r.key for r in model_split[name]}
        patients = {r.patient_id for r in model_split[name] if r.patient_id}
        result[f"images_in_model_{name}"] = sum(r.key in keys for r in evaluated)
        result[f"patients_in_model_{name}"] = len({r.patient_id for r in evaluated} & patients)
    return result


def drop_seen_patients(
    model_dir: Path, records: Sequence[Record], evaluated: Sequence[Record], held_out: str
) -> tuple[list[Record], dict]:
    """Held-out mode: leave out images of patients the model met in another source (linked ids).

    Only the link through another source is forgiven: if the model trained on images of
    the held-out source itself, the leakage check that follows still refuses the run.
    """
    path = Path(model_dir) / MODEL_SPLIT_FILE
    if not path.is_file():
        return list(evaluated), {"images": 0, "patients": 0}
    model_split = read_split(path, records)
    seen = {
        r.patient_id
        for name in ("train", "val")
        for r in model_split[name]
        if r.patient_id and r.source != held_out
    }
    kept = [r for r in evaluated if not (r.patient_id and r.patient_id in seen)]
    dropped = {r.patient_id for r in evaluated if r.patient_id and r.patient_id in seen}
    return kept, {"images": len(evaluated) - len(kept), "patients": len(dropped)}


def select_records(
    args: argparse.Namespace, records: list[Record], split: dict[str, list[Record]] | None
) -> tuple[list[Record], list[Record], list[Record]]:
    """(evaluated, baseline train, baseline validation) records for the chosen mode."""
    if split is not None and args.subset not in split:
        raise SystemExit(f"error: subset {args.subset!r} not in {args.split} ({sorted(split)})")
    held_out = args.leave_one_source_out
    if held_out is None:
        return split[args.subset], split.get("train", []), split.get("val", [])
    evaluated = [r for r in records if r.source == held_out]
    if not evaluated:
        raise SystemExit(f"error: no images of source {held_out!r} in {args.manifest}")
    # Patients can appear in several sources (linked ids): keep them out of the baseline's training.
    held_patients = {r.patient_id for r in evaluated if r.patient_id}
    pool = split.get("train", []) if split else records
    train = [r for r in pool if r.source != held_out and r.patient_id not in held_patients]
    val = split.get("val", []) if split else []
    val = [r for r in val if r.source != held_out and r.patient_id not in held_patients]
    return evaluated, train, val


def evaluate(args: argparse.Namespace) -> dict:
    """Run the whole evaluation and write report.json, report.md, predictions.csv and plots."""
    from ml.predictor import Predictor

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_manifest(args.manifest)
    split = read_split(args.split, records) if args.split else None
    evaluated, base_train, base_val = select_records(args, records, split)
    seen_dropped = {"images": 0, "patients": 0}
    if args.leave_one_source_out is not None:
        evaluated, seen_dropped = drop_seen_patients(
            args.model, records, evaluated, args.leave_one_source_out
        )

    overlap = model_training_overlap(args.model, records, evaluated)
    if overlap["checked"] and (
        overlap["images_in_model_train"] or overlap["patients_in_model_train"]
    ):
        raise SystemExit(
            f"error: {overlap['images_in_model_train']} evaluated images and "
            f"{overlap['patients_in_model_train']} patients were in the model's training data "
            f"({Path(args.model) / MODEL_SPLIT_FILE}); evaluate on its own test subset "
            "(--split MODEL/split.csv) or, for a held-out source, train with --exclude-source"
        )
    excluded = read_metadata(args.model).training_data.get("excluded_sources")
    held_out = args.leave_one_source_out
    if held_out is not None and isinstance(excluded, list) and held_out not in excluded:
        raise SystemExit(
            f"error: the model was trained with excluded_sources={excluded}, not {held_out!r}; "
            f"train it with `python -m ml.training.train --exclude-source {held_out}`"
        )
    predictor = Predictor.load(args.model)
    meta = predictor.metadata
    # The ONLY threshold for the model: chosen on validation data when the artifact was made.
    threshold = float(meta.threshold)
    cache = ThumbnailCache()
    scores = score_with_model(predictor, evaluated, args.batch_size, cache)
    y = np.array([r.target for r in evaluated])

    baseline = ThumbnailBaseline(C=DEFAULT_C, cache=cache).fit(base_train)
    base_scores = baseline.predict_proba(evaluated)
    target = _target_sensitivity(meta.training_data, meta.metrics)
    base_threshold, base_threshold_from = baseline_threshold(baseline, base_train, base_val, target)

    by_source = lambda r: r.source  # noqa: E731
    by_view = lambda r: r.view  # noqa: E731
    model_block = {
        "overall": summarise(evaluated, scores, threshold, args.n_boot),
        "calibration": calibration(y, scores),
        "by_source": breakdown(evaluated, scores, threshold, by_source),
        "by_view": breakdown(evaluated, scores, threshold, by_view),
    }
    base_block = {
        "description": "logistic regression on standardised 32x32 thumbnails (ml/baseline.py)",
        "C": DEFAULT_C,
        "n_train": len(base_train),
        "train_sources": sorted({r.source for r in base_train}),
        "threshold": base_threshold,
        "threshold_chosen_on": base_threshold_from,
        "target_sensitivity": target,
        "overall": summarise(evaluated, base_scores, base_threshold, args.n_boot),
        "by_source": breakdown(evaluated, base_scores, base_threshold, by_source),
        "by_view": breakdown(evaluated, base_scores, base_threshold, by_view),
    }
    diff = bootstrap_auroc_difference(
        y, scores, base_scores, n_boot=args.n_boot, groups=group_ids(evaluated)
    )
    comparison = {
        "model_auroc": model_block["overall"]["auroc"],
        "baseline_auroc": base_block["overall"]["auroc"],
        "difference": diff["difference"],
        "difference_ci": diff["ci"],
    }
    if held_out is not None:
        model_auroc, difference = comparison["model_auroc"], comparison["difference"]
        comparison["targets"] = {
            "model_auroc_min": TARGET_HELD_OUT_AUROC,
            "margin_over_baseline_min": TARGET_MARGIN_OVER_BASELINE,
            "met": model_auroc is not None
            and difference is not None
            and model_auroc >= TARGET_HELD_OUT_AUROC
            and difference >= TARGET_MARGIN_OVER_BASELINE,
        }

    predictability = None
    # A property of the data, not of the model: can thumbnails tell the collections apart?
    if split is not None and split.get("train") and split.get(args.subset):
        predictability = source_predictability(split["train"], split[args.subset], cache)

    report = {
        "title": f"held-out source {held_out}" if held_out else f"{args.subset} subset",
        "mode": "leave_one_source_out" if held_out else "split",
        "held_out_source": held_out,
        "subset": None if held_out else args.subset,
        "command": shlex.join([sys.executable, "-m", "ml.evaluation.evaluate", *args.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "dir": str(args.model),
            "model_version": meta.model_version,
            "sha256": meta.weights_sha256,
            "trained": meta.trained,
            "input_size": meta.input_size,
            "threshold": threshold,
            "threshold_source": "artifact metadata (chosen on validation data at training time)",
            "training_data": meta.training_data,
            "overlap_with_evaluated": overlap,
        },
        "data": {
            "manifest": str(args.manifest),
            "manifest_sha256": sha256_file(args.manifest),
            "split": str(args.split) if args.split else None,
            "split_sha256": sha256_file(args.split) if args.split else None,
            "n_evaluated": len(evaluated),
            "positives": int(y.sum()),
            "held_out_patients_also_in_other_sources": _shared_patients(records, held_out),
            "left_out_as_seen_in_training": seen_dropped,
        },
        "ci_method": CI_NOTE,
        "model_results": model_block,
        "baseline": base_block,
        "comparison": comparison,
        "within_source": within_source(evaluated, scores, base_scores, args.n_boot),
        "source_predictability": predictability,
    }
    write_predictions(out / "predictions.csv", evaluated, scores, base_scores, threshold)
    report["files"] = {
        **write_plots(out, y, model_block, base_block, scores, base_scores, report),
        "predictions": "predictions.csv",
        "markdown": "report.md",
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _shared_patients(records: Sequence[Record], held_out: str | None) -> int | None:
    if held_out is None:
        return None
    inside = {r.patient_id for r in records if r.source == held_out and r.patient_id}
    return len(inside & {r.patient_id for r in records if r.source != held_out})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(prog="python -m ml.evaluation.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, type=Path, help="model artifact directory")
    parser.add_argument("--manifest", required=True, type=Path, help="manifest.csv of the data")
    parser.add_argument("--split", type=Path, help='split CSV "file,split" (train/val/test)')
    parser.add_argument("--out", required=True, type=Path, help="report directory (created)")
    parser.add_argument("--subset", default="test", help="split subset to evaluate (default test)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--leave-one-source-out", metavar="SOURCE",
        help="evaluate on all images of SOURCE; the model must have been trained without it",
    )  # fmt: skip
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.split is None and args.leave_one_source_out is None:
        parser.error("--split is required unless --leave-one-source-out is given")
    if args.n_boot < 1 or args.batch_size < 1:
        parser.error("--n-boot and --batch-size must be positive")
    if args.subset in ("train", "val") and args.leave_one_source_out is None:
        print(f"warning: evaluating on the {args.subset!r} subset gives optimistic numbers",
              file=sys.stderr)  # fmt: skip
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    report = evaluate(args)
    c = report["comparison"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(
        f"evaluated={report['data']['n_evaluated']} model_auroc={fmt(c['model_auroc'])} "
        f"baseline_auroc={fmt(c['baseline_auroc'])} difference={fmt(c['difference'])} "
        f"report={Path(args.out) / 'report.md'} seconds={report['seconds']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
