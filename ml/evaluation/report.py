"""What ml.evaluation.evaluate writes besides report.json: report.md, predictions.csv and the plots."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ml.evaluation.plots import (
    RocSeries,
    calibration_figure,
    confusion_matrix_figure,
    roc_figure,
    save_png,
)
from ml.training.data import Record


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


def write_plots(
    out: Path, y: np.ndarray, model: dict, base: dict, scores, base_scores, report
) -> dict:
    """Confusion matrix, ROC (model and baseline) and calibration PNGs; returns their file names."""
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
        *(
            [f"- left out: {d['images']} images of {d['patients']} patients the model saw in "
             "another source (linked patient ids)"]
            if (d := data.get("left_out_as_seen_in_training")) and d["images"]
            else []
        ),
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
