"""Tests for ml.experiments.compare: the experiments table from ml.evaluation.evaluate reports, checked by hand."""

import csv
import json
from pathlib import Path

import pytest

from ml.experiments import compare

FILES = [f"images/{i}.png" for i in range(6)]
TARGETS = [1, 1, 1, 0, 0, 0]
PATIENTS = ["p1", "p1", "p2", "p3", "p4", None]


def _report(folder: Path, scores: list[float], threshold: float, baseline: list[float]) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["file", "source", "view", "label", "target", "score", "predicted", "baseline_score"]
        )
        for f, t, s, b in zip(FILES, TARGETS, scores, baseline, strict=True):
            w.writerow([f, "src", "PA", "covid" if t else "normal", t, s, int(s >= threshold), b])
    return folder


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list[tuple[str, Path]]]:
    manifest = tmp_path / "manifest.csv"
    (tmp_path / "images").mkdir()
    for f in FILES:
        (tmp_path / f).touch()  # the manifest reader checks that files exist
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "patient_id", "source", "view"])
        for f, t, p in zip(FILES, TARGETS, PATIENTS, strict=True):
            w.writerow([f, "covid" if t else "normal", p or "", "src", "PA"])
    flat = [0.5] * 6
    reports = [
        # Perfect ranking; threshold 0.6 catches 2 of 3 COVID, no false positive.
        ("ref", _report(tmp_path / "a", [0.9, 0.8, 0.55, 0.3, 0.2, 0.1], 0.6, flat)),
        # One swapped pair (0.4 COVID below 0.45 non-COVID): AUROC 8/9.
        ("other", _report(tmp_path / "b", [0.9, 0.8, 0.4, 0.45, 0.2, 0.1], 0.3, flat)),
    ]
    return manifest, reports


def test_table_matches_hand_computed_figures(setup: tuple, tmp_path: Path) -> None:
    manifest, reports = setup
    args = [f"{n}={p}" for n, p in reports]
    assert compare.main(["--manifest", str(manifest), "--out", str(tmp_path / "o"), *args]) == 0
    result = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert result["images"] == 6 and result["covid"] == 3 and result["reference"] == "ref"
    ref, other = result["models"]["ref"], result["models"]["other"]
    assert ref["auroc"] == 1.0 and other["auroc"] == pytest.approx(8 / 9)
    assert ref["sensitivity"] == pytest.approx(2 / 3) and ref["specificity"] == 1.0
    # other's threshold 0.3: all three COVID caught, and the 0.45 non-COVID too.
    assert other["sensitivity"] == 1.0 and other["specificity"] == pytest.approx(2 / 3)
    assert ref["baseline_auroc"] == 0.5 and ref["minus_baseline"]["difference"] == 0.5
    assert other["minus_reference"]["difference"] == pytest.approx(8 / 9 - 1)
    low, high = other["minus_reference"]["ci"]
    assert low <= 8 / 9 - 1 <= high <= 0.0
    assert "minus_reference" not in ref
    text = (tmp_path / "o" / "comparison.md").read_text()
    assert "| other | 0.889" in text and "| model - ref |" in text


def test_reports_on_other_images_are_refused(setup: tuple, tmp_path: Path, capsys) -> None:
    manifest, reports = setup
    (reports[1][1] / "predictions.csv").write_text(
        "file,source,view,label,target,score,predicted,baseline_score\n"
        "images/9.png,src,PA,covid,1,0.9,1,0.5\n"
    )
    args = [f"{n}={p}" for n, p in reports]
    assert compare.main(["--manifest", str(manifest), "--out", str(tmp_path / "o"), *args]) == 2
    assert "other images" in capsys.readouterr().err
    missing = ["ref=" + str(reports[0][1]), f"x={tmp_path / 'nowhere'}"]
    assert compare.main(["--manifest", str(manifest), "--out", str(tmp_path / "o"), *missing]) == 2
    assert "no predictions.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--manifest", str(manifest), "--out", str(tmp_path / "o"), "no-equals-sign"])


def test_ensemble_row_is_the_mean_score(setup: tuple, tmp_path: Path, capsys) -> None:
    manifest, reports = setup
    args = [f"{n}={p}" for n, p in reports]
    out = str(tmp_path / "o")
    code = compare.main(["--manifest", str(manifest), "--out", out, "--ensemble", "both", *args])
    assert code == 0
    result = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert result["ensemble"] == {"name": "both", "of": ["ref", "other"]}
    both = result["models"]["both"]
    # Mean scores 0.9, 0.8, 0.475 (COVID) and 0.375, 0.2, 0.1: the swap is undone.
    assert both["auroc"] == 1.0 and both["minus_reference"]["difference"] == 0.0
    assert both["sensitivity"] is None and both["specificity"] is None
    assert "| both | 1.000" in (tmp_path / "o" / "comparison.md").read_text()
    capsys.readouterr()
    clash = ["--manifest", str(manifest), "--out", out, "--ensemble", "ref", *args]
    assert compare.main(clash) == 2
    assert "also the name of a report" in capsys.readouterr().err
