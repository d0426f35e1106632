"""`python -m ml.evaluation.evaluate` end to end on real X-rays with a tiny untrained model."""

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from ml.artifact import read_metadata
from tests.conftest import CXR_DIR, REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (source, label) -> images; each image from a different patient. Three sources, both classes,
# and ieee8023 holds both classes so that within-source and leave-one-source-out have meaning.
PICK = {
    ("hannover-mhh", "covid"): 4,
    ("kermany-pediatric", "normal"): 4,
    ("kermany-pediatric", "pneumonia"): 4,
    ("ieee8023-covid-chestxray", "covid"): 4,
    ("ieee8023-covid-chestxray", "pneumonia"): 4,
}
SPLIT_ORDER = ("train", "train", "val", "test")
# Not 0.5 (the untrained default): proves the report uses the artifact's value.
ARTIFACT_THRESHOLD = 0.8765


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A manifest of 20 real images (links into the shared data) and a patient-disjoint split."""
    root = tmp_path_factory.mktemp("cxr")
    (root / "images").symlink_to(CXR_DIR / "images")
    with open(CXR_DIR / "manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    picked, patients, counts = [], set(), defaultdict(int)
    for row in rows:
        key = (row["source"], row["label"])
        if (
            counts[key] < PICK.get(key, 0)
            and row["patient_id"]
            and row["patient_id"] not in patients
        ):
            patients.add(row["patient_id"])
            row["split"] = SPLIT_ORDER[counts[key]]
            counts[key] += 1
            picked.append(row)
    assert len(picked) == sum(PICK.values())
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(picked)
    with open(root / "split.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "split"])
        writer.writerows([row["file"], row["split"]] for row in picked)
    return root


def _split_rows(dataset: Path) -> list[list[str]]:
    with open(dataset / "split.csv", newline="") as fh:
        return [[row["file"], row["split"]] for row in csv.DictReader(fh)]


def _model_copy(
    tiny_model_dir: Path, out: Path, split_rows: list[list[str]] | None, excluded: list[str] = ()
) -> Path:
    """The tiny artifact with a non-default threshold, and what ml.training.train would leave with it."""
    shutil.copytree(tiny_model_dir, out)
    meta = json.loads((out / "metadata.json").read_text())
    meta["threshold"] = ARTIFACT_THRESHOLD
    meta["training_data"]["excluded_sources"] = list(excluded)
    (out / "metadata.json").write_text(json.dumps(meta))
    if split_rows is not None:
        with open(out / "split.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([["file", "split"], *split_rows])
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, dataset, tmp_path_factory) -> Path:
    """A model 'trained' on the dataset's split: its train and val subsets, not its test subset."""
    return _model_copy(tiny_model_dir, tmp_path_factory.mktemp("model") / "m", _split_rows(dataset))


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ml.evaluation.evaluate", "--n-boot", "100", "--batch-size", "8", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def split_report(dataset, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    _evaluate(
        "--model", str(model_dir), "--manifest", str(dataset / "manifest.csv"),
        "--split", str(dataset / "split.csv"), "--out", str(out),
    )  # fmt: skip
    return out


def _predictions(report_dir: Path) -> list[dict]:
    with open(report_dir / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_report_numbers_agree_with_the_per_image_scores(split_report):
    report = json.loads((split_report / "report.json").read_text())
    rows = _predictions(split_report)
    overall = report["model_results"]["overall"]
    cm = overall["confusion_matrix"]
    assert len(rows) == overall["n"] == report["data"]["n_evaluated"] == 5  # the test subset
    assert sum(cm.values()) == overall["n"]
    tp = sum(r["target"] == "1" and r["predicted"] == "1" for r in rows)
    fn = sum(r["target"] == "1" and r["predicted"] == "0" for r in rows)
    tn = sum(r["target"] == "0" and r["predicted"] == "0" for r in rows)
    assert (cm["tp"], cm["fn"], cm["tn"]) == (tp, fn, tn)
    assert overall["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert overall["classification_report"]["covid"]["support"] == tp + fn
    lo, hi = overall["ci"]["auroc"]
    assert lo <= overall["auroc"] <= hi
    assert set(report["model_results"]["by_source"]) == {r["source"] for r in rows}


def test_threshold_is_the_artifacts_never_refitted(split_report, model_dir):
    report = json.loads((split_report / "report.json").read_text())
    threshold = read_metadata(model_dir).threshold
    assert threshold == ARTIFACT_THRESHOLD
    assert report["model"]["threshold"] == threshold
    assert report["model_results"]["overall"]["threshold"] == threshold
    for row in _predictions(split_report):
        assert row["predicted"] == str(int(float(row["score"]) >= threshold))
    # The baseline's own threshold comes from validation images, not the evaluated ones.
    assert report["baseline"]["threshold_chosen_on"] == "validation subset"


def test_report_has_baseline_plots_and_provenance(split_report, model_dir):
    report = json.loads((split_report / "report.json").read_text())
    for name in ("confusion_matrix", "roc", "calibration"):
        assert (split_report / report["files"][name]).read_bytes().startswith(PNG_MAGIC)
    base = report["baseline"]
    assert base["n_train"] == 10 and base["overall"]["n"] == 5
    assert report["comparison"]["difference"] == pytest.approx(
        report["comparison"]["model_auroc"] - report["comparison"]["baseline_auroc"]
    )
    assert "ieee8023-covid-chestxray" in report["within_source"]
    assert report["source_predictability"]["n_test"] == 5
    assert report["model"]["sha256"] == read_metadata(model_dir).weights_sha256
    overlap = report["model"]["overlap_with_evaluated"]
    assert overlap["checked"] and overlap["images_in_model_train"] == 0
    assert overlap["patients_in_model_val"] == 0
    assert len(report["data"]["split_sha256"]) == 64 and "ml.evaluation.evaluate" in report["command"]
    text = (split_report / "report.md").read_text()
    assert "thumbnail baseline" in text and "![ROC" in text and "Within-source" in text


def test_a_model_that_trained_on_the_evaluated_images_is_refused(dataset, tiny_model_dir, tmp_path):
    from ml.evaluation.evaluate import main

    leaky = [[file, "train" if split == "test" else split] for file, split in _split_rows(dataset)]
    model = _model_copy(tiny_model_dir, tmp_path / "leaky", leaky)
    args = ["--model", str(model), "--manifest", str(dataset / "manifest.csv"),
            "--split", str(dataset / "split.csv"), "--out", str(tmp_path / "r")]  # fmt: skip
    with pytest.raises(SystemExit, match="5 evaluated images and 5 patients were in the model"):
        main(args)
    with pytest.raises(SystemExit, match="were in the model's training data"):
        main([*args[:4], "--leave-one-source-out", "hannover-mhh", "--out", str(tmp_path / "r")])
    other = _model_copy(tiny_model_dir, tmp_path / "other", None, excluded=["hannover-mhh"])
    with pytest.raises(SystemExit, match="excluded_sources=.'hannover-mhh'., not 'kermany"):
        main(["--model", str(other), *args[2:4], "--leave-one-source-out", "kermany-pediatric",
              "--out", str(tmp_path / "r")])  # fmt: skip


def test_leave_one_source_out_scores_every_image_of_the_source(dataset, tiny_model_dir, tmp_path):
    held_out = "ieee8023-covid-chestxray"
    sources = {}
    with open(dataset / "manifest.csv", newline="") as fh:
        sources = {row["file"]: row["source"] for row in csv.DictReader(fh)}
    # As `ml.training.train --exclude-source` leaves it: the source is gone from train and val.
    rows = [
        [file, split]
        for file, split in _split_rows(dataset)
        if split == "test" or sources[file] != held_out
    ]
    model = _model_copy(tiny_model_dir, tmp_path / "loso", rows, excluded=[held_out])
    done = _evaluate(
        "--model", str(model), "--manifest", str(dataset / "manifest.csv"),
        "--leave-one-source-out", held_out, "--out", str(tmp_path / "report"),
    )  # fmt: skip
    assert "baseline_auroc=" in done.stdout
    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "leave_one_source_out" and report["held_out_source"] == held_out
    assert report["data"]["n_evaluated"] == 8
    assert {r["source"] for r in _predictions(out)} == {held_out}
    assert report["model"]["overlap_with_evaluated"]["images_in_model_train"] == 0
    assert held_out not in report["baseline"]["train_sources"]
    assert report["baseline"]["n_train"] == 12  # every image of the other sources (no split)
    assert report["model"]["threshold"] == ARTIFACT_THRESHOLD
    targets = report["comparison"]["targets"]
    assert targets["model_auroc_min"] == 0.80 and targets["margin_over_baseline_min"] == 0.15
    assert isinstance(targets["met"], bool)


def test_cli_refuses_a_run_without_a_split_or_held_out_source(capsys):
    from ml.evaluation.evaluate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--manifest", "x.csv", "--out", "r"])
    assert "--split is required" in capsys.readouterr().err


def test_held_out_mode_leaves_out_patients_seen_in_another_source(tmp_path):
    from ml.evaluation.evaluate import drop_seen_patients
    from ml.training.data import Record

    def rec(name: str, source: str, patient: str | None) -> Record:
        return Record(path=tmp_path / name, label="covid", target=1, source=source,
                      patient_id=patient, view="PA")

    seen = rec("a.png", "other", "linked:1")
    held_in_train = rec("e.png", "held", "p3")
    records = [seen, rec("b.png", "held", "linked:1"), rec("c.png", "held", "p2"),
               rec("d.png", "held", None), held_in_train]
    (tmp_path / "model").mkdir()
    from ml.training.data import write_split

    write_split({"train": [seen, held_in_train], "val": [], "test": []},
                tmp_path / "model" / "split.csv")
    kept, info = drop_seen_patients(tmp_path / "model", records, records[1:], "held")
    # The linked patient is left out; the held-out source's own image in train is kept,
    # so the leakage check that follows refuses the run.
    assert [r.path.name for r in kept] == ["c.png", "d.png", "e.png"]
    assert info == {"images": 1, "patients": 1}
