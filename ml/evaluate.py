"""Evaluate a model artifact on held-out X-rays, beside the thumbnail shortcut baseline.

    python -m ml.evaluate --model DIR --manifest CSV --split SPLIT.csv --out REPORT_DIR
    python -m ml.evaluate --model DIR --manifest CSV --leave-one-source-out SOURCE --out REPORT_DIR

The decision threshold is the artifact's (chosen on validation data at training
time); nothing here is ever tuned on the images being evaluated. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ml.artifact import read_metadata, sha256_file
from ml.baseline import DEFAULT_C, ThumbnailBaseline, ThumbnailCache, source_predictability
from ml.data import Record, load_manifest, read_split
from ml.imaging import decode_image
from ml.metrics import (
    auroc,
    binary_report,
    bootstrap_auroc_difference,
    bootstrap_ci,
    calibration,
    choose_threshold,
)
from ml.plots import RocSeries, calibration_figure, confusion_matrix_figure, roc_figure, save_png

# The bar for a held-out source: the model must reach this AUROC and beat the baseline by this.
TARGET_HELD_OUT_AUROC = 0.80
TARGET_MARGIN_OVER_BASELINE = 0.15
DEFAULT_TARGET_SENSITIVITY = 0.90
MODEL_SPLIT_FILE = "split.csv"  # written by ml.train next to the artifact
CI_NOTE = (
    "95% percentile bootstrap intervals, resampling patients (images without a patient id "
    "count as their own patient). They cover sampling noise on these images only, not a shift "
    "to another hospital, and an image-level bootstrap would be narrower still (too optimistic)."
)


def group_ids(records: Sequence[Record]) -> list[str]:
    """Resampling units for the bootstrap: the patient, or the image when the patient is unknown."""
    return [r.patient_id or f"image:{r.path}" for r in records]


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


def summarise(records: Sequence[Record], scores: np.ndarray, threshold: float, n_boot: int) -> dict:
    """binary_report plus patient-level bootstrap intervals."""
    y = np.array([r.target for r in records])
    return {
        **binary_report(y, scores, threshold),
        "ci": bootstrap_ci(y, scores, threshold, n_boot=n_boot, groups=group_ids(records)),
    }


def breakdown(
    records: Sequence[Record], scores: np.ndarray, threshold: float, key: Callable[[Record], str]
) -> dict[str, dict]:
    """Per-group n, positives, AUROC (both classes only), sensitivity and specificity at threshold."""
    out: dict[str, dict] = {}
    for value in sorted({key(r) for r in records}):
        idx = [i for i, r in enumerate(records) if key(r) == value]
        rep = binary_report([records[i].target for i in idx], scores[idx], threshold)
        out[value] = {
            k: rep[k] for k in ("n", "positives", "auroc", "sensitivity", "specificity", "accuracy")
        }
    return out


def within_source(
    records: Sequence[Record], model_scores: np.ndarray, baseline_scores: np.ndarray, n_boot: int
) -> dict[str, dict]:
    """AUROC inside each source that has both classes: no source cue can help there."""
    out: dict[str, dict] = {}
    for source in sorted({r.source for r in records}):
        idx = np.array([i for i, r in enumerate(records) if r.source == source])
        sub = [records[i] for i in idx]
        y = np.array([r.target for r in sub])
        if y.min() == y.max():
            continue
        groups = group_ids(sub)
        entry = {"n": len(sub), "positives": int(y.sum())}
        for name, scores in (("model", model_scores[idx]), ("baseline", baseline_scores[idx])):
            ci = bootstrap_ci(y, scores, 0.5, n_boot=n_boot, groups=groups)["auroc"]
            entry[name] = {"auroc": auroc(y, scores), "ci": ci}
        out[source] = entry
    return out


def baseline_threshold(
    baseline: ThumbnailBaseline, train: Sequence[Record], val: Sequence[Record], target: float
) -> tuple[float, str]:
    """The baseline's threshold at the model's target sensitivity, never from the test images.

    On the split's validation subset when it has COVID images; otherwise on out-of-fold
    scores of the training images (5 patient-grouped folds).
    """
    if any(r.target for r in val):
        scores = baseline.predict_proba(val)
        return choose_threshold([r.target for r in val], scores, target), "validation subset"
    from sklearn.model_selection import GroupKFold

    y = np.array([r.target for r in train])
    oof = np.zeros(len(train))
    folds = GroupKFold(n_splits=min(5, len(set(group_ids(train)))))
    for fit_idx, held_idx in folds.split(np.zeros(len(train)), y, group_ids(train)):
        fold = ThumbnailBaseline(C=baseline.C, cache=baseline.cache)
        fold.fit([train[i] for i in fit_idx])
        oof[held_idx] = fold.predict_proba([train[i] for i in held_idx])
    return choose_threshold(y, oof, target), "out-of-fold training scores (no validation subset)"


def _target_sensitivity(training_data: dict, metrics: dict) -> float:
    for source in (metrics, training_data):
        value = source.get("target_sensitivity")
        if isinstance(value, int | float) and 0.0 < value <= 1.0:
            return float(value)
    return DEFAULT_TARGET_SENSITIVITY


def write_predictions(
    path: Path,
    records: Sequence[Record],
    scores: np.ndarray,
    baseline: np.ndarray,
    threshold: float,
) -> None:
    """One row per image: what was scored and what the model said."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["file", "source", "view", "label", "target", "score", "predicted", "baseline_score"]
        )
        for r, s, b in zip(records, scores, baseline, strict=True):
            predicted = int(float(s) >= threshold)
            writer.writerow(
                [r.key, r.source, r.view, r.label, r.target,
                 repr(float(s)), predicted, f"{float(b):.6f}"]
            )  # fmt: skip


def model_training_overlap(
    model_dir: Path, records: Sequence[Record], evaluated: Sequence[Record]
) -> dict:
    """Compare the evaluated images with the split.csv that ml.train leaves in the model directory.

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


def _plots(out: Path, y: np.ndarray, model: dict, base: dict, scores, base_scores, report) -> dict:
    title = report["title"]
    files = {
        "confusion_matrix": "confusion_matrix.png",
        "roc": "roc.png",
        "calibration": "calibration.png",
    }
    cm = model["overall"]["confusion_matrix"]
    save_png(
        confusion_matrix_figure(cm, f"Confusion matrix, {title}"), out / files["confusion_matrix"]
    )
    series = [
        RocSeries(
            f"model {report['model']['model_version']}", y, scores,
            model["overall"]["auroc"], model["overall"]["ci"]["auroc"], report["model"]["threshold"],
        ),
        RocSeries(
            "thumbnail baseline (32x32 logistic)", y, base_scores,
            base["overall"]["auroc"], base["overall"]["ci"]["auroc"], base["threshold"],
        ),
    ]  # fmt: skip
    save_png(roc_figure(series, f"ROC, {title}"), out / files["roc"])
    save_png(
        calibration_figure(model["calibration"]["bins"], f"Calibration, {title}"),
        out / files["calibration"],
    )
    return files


def evaluate(args: argparse.Namespace) -> dict:
    """Run the whole evaluation and write report.json, report.md, predictions.csv and plots."""
    from ml.predictor import Predictor

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_manifest(args.manifest)
    split = read_split(args.split, records) if args.split else None
    evaluated, base_train, base_val = select_records(args, records, split)

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
            f"train it with `python -m ml.train --exclude-source {held_out}`"
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
        "command": shlex.join([sys.executable, "-m", "ml.evaluate", *args.argv]),
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
        **_plots(out, y, model_block, base_block, scores, base_scores, report),
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


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _group_table(model: dict[str, dict], base: dict[str, dict], name: str) -> list[str]:
    lines = [
        f"| {name} | n | COVID | model AUROC | model sens | model spec | baseline AUROC "
        "| baseline sens | baseline spec |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, m in model.items():
        b = base[key]
        lines.append(
            f"| {key} | {m['n']} | {m['positives']} | {_f(m['auroc'])} | {_f(m['sensitivity'])} "
            f"| {_f(m['specificity'])} | {_f(b['auroc'])} | {_f(b['sensitivity'])} "
            f"| {_f(b['specificity'])} |"
        )
    return lines


def _overlap_note(overlap: dict) -> str:
    if not overlap["checked"]:
        return f"leakage check not done ({overlap['reason']}): make sure the model never saw these images"
    note = (
        f"leakage check against the model's split.csv: {overlap['images_in_model_train']} "
        f"evaluated images / {overlap['patients_in_model_train']} patients in its train subset, "
        f"{overlap['images_in_model_val']} / {overlap['patients_in_model_val']} in its val subset"
    )
    if overlap["images_in_model_val"] or overlap["patients_in_model_val"]:
        note += " (**optimistic**: the model was tuned on those)"
    return note


def render_markdown(report: dict) -> str:
    """A readable report: headline, tables and links to the plots."""
    model, base, comp = report["model_results"], report["baseline"], report["comparison"]
    m, b = model["overall"], base["overall"]
    meta, data = report["model"], report["data"]
    lines = [
        f"# Evaluation: {meta['model_version']} on the {report['title']}",
        "",
        f"- date {report['date']}; command `{report['command']}`",
        f"- model sha256 `{meta['sha256']}`; trained: {meta['trained']}; input {meta['input_size']}",
        f"- manifest sha256 `{data['manifest_sha256']}`; split sha256 `{data['split_sha256']}`",
        f"- {data['n_evaluated']} images, {data['positives']} COVID",
        f"- threshold {meta['threshold']:.4f}, from the {meta['threshold_source']}",
        f"- {_overlap_note(meta['overlap_with_evaluated'])}",
        "",
        *(
            ["**UNTRAINED model (random weights): its numbers are meaningless.**", ""]
            if not meta["trained"]
            else []
        ),
        "Research use only. Labels and sources are confounded in this data set: read the "
        "baseline and within-source rows before trusting the headline (docs/evaluation.md).",
        "",
        "## Model vs the thumbnail shortcut baseline",
        "",
        "| | AUROC (95% CI) | sensitivity | specificity | PPV | NPV | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in (("model", m), ("thumbnail baseline", b)):
        ci = r["ci"]
        lines.append(
            f"| {name} | {_f(r['auroc'])}{_ci(ci['auroc'])} | {_f(r['sensitivity'])}"
            f"{_ci(ci['sensitivity'])} | {_f(r['specificity'])}{_ci(ci['specificity'])} "
            f"| {_f(r['ppv'])} | {_f(r['npv'])} | {_f(r['accuracy'])} |"
        )
    lines += [
        "",
        f"AUROC difference (model - baseline): {_f(comp['difference'])}{_ci(comp['difference_ci'])}"
        " (paired bootstrap).",
    ]
    if "targets" in comp:
        t = comp["targets"]
        lines.append(
            f"Target on a held-out source: AUROC >= {t['model_auroc_min']} and >= "
            f"{t['margin_over_baseline_min']} above the baseline: **{'met' if t['met'] else 'NOT met'}**."
        )
    lines += [
        "",
        f"The baseline is a {base['description']}, C={base['C']}, fitted on {base['n_train']} "
        f"images from {', '.join(base['train_sources'])}; its threshold "
        f"{base['threshold']:.4f} was chosen on the {base['threshold_chosen_on']} at sensitivity "
        f"{base['target_sensitivity']:.2f}.",
        "",
        f"{report['ci_method']}",
        "",
        "## Within-source AUROC (the collection label cannot give the answer away here)",
        "",
    ]
    if report["within_source"]:
        lines += ["| source | n | COVID | model AUROC | baseline AUROC |", "|---|---|---|---|---|"]
        for source, w in report["within_source"].items():
            lines.append(
                f"| {source} | {w['n']} | {w['positives']} | {_f(w['model']['auroc'])}"
                f"{_ci(w['model']['ci'])} | {_f(w['baseline']['auroc'])}{_ci(w['baseline']['ci'])} |"
            )
    else:
        lines.append("No evaluated source contains both classes.")
    lines += ["", "## By source", ""]
    lines += _group_table(model["by_source"], base["by_source"], "source")
    lines += ["", "## By view", ""]
    lines += _group_table(model["by_view"], base["by_view"], "view")
    sp = report["source_predictability"]
    lines += ["", "## Source predictability from thumbnails", ""]
    if sp:
        lines.append(
            f"A multinomial logistic regression on the same thumbnails names the source of "
            f"{sp['accuracy']:.1%} of {sp['n_test']} evaluated images (chance, the largest "
            f"source's share: {sp['chance']:.1%})."
        )
    else:
        lines.append("Not computed (needs a split with a train subset).")
    cm, rep = m["confusion_matrix"], m["classification_report"]
    lines += [
        "",
        "## Model at its threshold",
        "",
        f"Confusion matrix: TN {cm['tn']}, FP {cm['fp']}, FN {cm['fn']}, TP {cm['tp']}. "
        f"Calibration: Brier {_f(model['calibration']['brier'])}, "
        f"ECE {_f(model['calibration']['ece'])}.",
        "",
        "| | precision | recall | f1-score | support |",
        "|---|---|---|---|---|",
    ]
    for row in ("non-covid", "covid", "macro avg", "weighted avg"):
        r = rep[row]
        lines.append(
            f"| {row} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1-score']:.3f} "
            f"| {int(r['support'])} |"
        )
    lines.append(
        f"| accuracy | | | {rep['accuracy']:.3f} | {cm['tn'] + cm['fp'] + cm['fn'] + cm['tp']} |"
    )
    files = report["files"]
    lines += [
        "",
        "## Plots",
        "",
        f"![ROC, model and baseline]({files['roc']})",
        f"![Confusion matrix]({files['confusion_matrix']})",
        f"![Calibration]({files['calibration']})",
        "",
        f"Per-image scores: [{files['predictions']}]({files['predictions']}).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(prog="python -m ml.evaluate", description=__doc__,
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
