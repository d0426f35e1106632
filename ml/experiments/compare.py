"""Compare ml.evaluation.evaluate reports of several models on the same images: the experiments table.

    python -m ml.experiments.compare --manifest CSV --out DIR NAME=REPORT_DIR [NAME=REPORT_DIR ...]

Each REPORT_DIR is an ml.evaluation.evaluate output (its predictions.csv); all must have scored the same
images. The first is the reference: every other model's AUROC is compared with it on the
same patients (paired bootstrap), as is each model with its own thumbnail baseline. Writes
comparison.json and comparison.md. The manifest supplies the patient ids the bootstrap
resamples (predictions.csv holds none).

--ensemble NAME adds a row for the mean of all the models' scores (a deep ensemble): whether
the models' errors are independent (the mean ranks better than each) or shared. It has no
validation-chosen threshold, so no sensitivity or specificity.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from ml.evaluation.metrics import auroc, binary_report, bootstrap_auroc_difference, bootstrap_ci
from ml.training.data import load_manifest

PREDICTIONS = "predictions.csv"


class CompareError(ValueError):
    """A report that cannot be compared: missing, or scored on other images."""


def read_predictions(report: Path) -> dict[str, dict]:
    """file -> {target, score, predicted, baseline_score} from an ml.evaluation.evaluate report folder."""
    path = report / PREDICTIONS
    if not path.is_file():
        raise CompareError(f"{report}: no {PREDICTIONS} (not an ml.evaluation.evaluate report?)")
    with open(path, newline="") as fh:
        rows = {
            row["file"]: {
                "target": int(row["target"]),
                "score": float(row["score"]),
                "predicted": int(row["predicted"]),
                "baseline_score": float(row["baseline_score"]),
            }
            for row in csv.DictReader(fh)
        }
    if not rows:
        raise CompareError(f"{path} holds no predictions")
    return rows


def compare(
    reports: list[tuple[str, Path]],
    patients: dict[str, str | None],
    n_boot: int = 1000,
    ensemble: str | None = None,
) -> dict:
    """The comparison of reports (name, folder); patients maps manifest file -> patient id."""
    if len(reports) < 2:
        raise CompareError("give at least two reports")
    tables = {name: read_predictions(folder) for name, folder in reports}
    if ensemble in tables:
        raise CompareError(f"--ensemble {ensemble!r} is also the name of a report")
    ref_name = reports[0][0]
    files = sorted(tables[ref_name])
    for name, rows in tables.items():
        if sorted(rows) != files:
            raise CompareError(
                f"{name} scored other images than {ref_name}; compare like with like"
            )
        if [rows[f]["target"] for f in files] != [tables[ref_name][f]["target"] for f in files]:
            raise CompareError(f"{name} has other labels than {ref_name} for the same files")
    y = np.array([tables[ref_name][f]["target"] for f in files])
    groups = [patients.get(f) or f"image:{f}" for f in files]
    ref = np.array([tables[ref_name][f]["score"] for f in files])
    out = {"images": len(files), "covid": int(y.sum()), "reference": ref_name, "models": {}}
    if ensemble:
        mean = {f: np.mean([t[f]["score"] for t in tables.values()]) for f in files}
        tables[ensemble] = {
            f: {**tables[ref_name][f], "score": float(mean[f]), "predicted": None} for f in files
        }
        out["ensemble"] = {"name": ensemble, "of": [name for name, _ in reports]}
    for name, rows in tables.items():
        scores = np.array([rows[f]["score"] for f in files])
        baseline = np.array([rows[f]["baseline_score"] for f in files])
        sensitivity = specificity = None
        if name != ensemble:
            # Each model's own threshold, as ml.evaluation.evaluate applied it (predicted column).
            predicted = np.array([rows[f]["predicted"] for f in files])
            at_threshold = binary_report(y, predicted.astype(float), 0.5)
            sensitivity, specificity = at_threshold["sensitivity"], at_threshold["specificity"]
        entry = {
            "auroc": auroc(y, scores),
            "auroc_ci": bootstrap_ci(y, scores, 0.5, n_boot=n_boot, groups=groups)["auroc"],
            "sensitivity": sensitivity,
            "specificity": specificity,
            "baseline_auroc": auroc(y, baseline),
            "minus_baseline": bootstrap_auroc_difference(
                y, scores, baseline, n_boot=n_boot, groups=groups
            ),
        }
        if name != ref_name:
            entry["minus_reference"] = bootstrap_auroc_difference(
                y, scores, ref, n_boot=n_boot, groups=groups
            )
        out["models"][name] = entry
    return out


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _diff(d: dict | None) -> str:
    return "—" if not d or d["difference"] is None else f"{d['difference']:+.3f}{_ci(d['ci'])}"


def render(result: dict, reports: list[tuple[str, Path]]) -> str:
    """comparison.md: one row per model."""
    lines = [
        f"# Comparison on {result['images']} images ({result['covid']} COVID)",
        "",
        "AUROC with 95% patient-bootstrap intervals; differences are paired (same resamples). "
        "Sensitivity and specificity at each model's own validation-chosen threshold.",
        "",
        "| model | AUROC | sensitivity | specificity | baseline AUROC | model - baseline "
        f"| model - {result['reference']} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        lines.append(
            f"| {name} | {_num(m['auroc'])}{_ci(m['auroc_ci'])} | {_num(m['sensitivity'])} "
            f"| {_num(m['specificity'])} | {_num(m['baseline_auroc'])} "
            f"| {_diff(m['minus_baseline'])} | {_diff(m.get('minus_reference'))} |"
        )
    if "ensemble" in result:
        lines += [
            "",
            f"{result['ensemble']['name']}: the mean of the scores of all the other rows; "
            "it has no validation-chosen threshold.",
        ]
    lines += ["", "Reports:", ""]
    lines += [f"- {name}: `{folder}`" for name, folder in reports]
    return "\n".join(lines) + "\n"


def _report_arg(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=REPORT_DIR, got {text!r}")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m ml.experiments.compare", description=__doc__)
    p.add_argument("--manifest", required=True, help="the manifest the reports were scored from")
    p.add_argument("--out", required=True, help="folder for comparison.json and comparison.md")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples (default: %(default)s)")
    p.add_argument(
        "--ensemble", metavar="NAME", help="add a row NAME: the mean of all the models' scores"
    )
    p.add_argument("reports", nargs="+", type=_report_arg, metavar="NAME=REPORT_DIR")
    args = p.parse_args(argv)
    try:
        patients = {r.file: r.patient_id for r in load_manifest(args.manifest)}
        result = compare(args.reports, patients, n_boot=args.bootstrap, ensemble=args.ensemble)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result, args.reports)
    (out / "comparison.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
