"""Tests for ml.training.data: manifests, patient-disjoint splits, split files, sampling, image cache."""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ml.imaging import decode_image
from ml.preprocess import preprocess, to_caffe
from ml.training import data
from tests.conftest import CXR_DIR, FIXTURES

MANIFEST = CXR_DIR / "manifest.csv"


@pytest.fixture(scope="module")
def records() -> list[data.Record]:
    return data.load_manifest(MANIFEST)


@pytest.fixture(scope="module")
def split(records: list[data.Record]) -> dict[str, list[data.Record]]:
    return data.split_by_patient(records, seed=0)


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _record(pid: str | None, target: int = 0, source: str = "s", name: str = "") -> data.Record:
    name = name or f"{pid}-{target}-{source}.png"
    return data.Record(
        path=Path(name),
        label="covid" if target else "normal",
        target=target,
        source=source,
        patient_id=pid,
        view="PA",
        file=name,
    )


# --- manifests -------------------------------------------------------------------------------


def test_real_manifest_is_read_whole(records: list[data.Record]) -> None:
    with open(MANIFEST, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(records) == len(rows) == 3542
    assert [r.file for r in records] == [row["file"] for row in rows]
    assert all(r.target == (r.label == "covid") for r in records)
    assert sum(r.target for r in records) == sum(row["label"] == "covid" for row in rows)
    assert sum(r.patient_id is None for r in records) == sum(not row["patient_id"] for row in rows)
    first = records[0]
    assert first.path == CXR_DIR / rows[0]["file"] and first.path.is_file()
    assert first.source == rows[0]["source"] and first.view == rows[0]["view"]


def test_folder_holding_manifest_csv_reads_the_csv(records: list[data.Record]) -> None:
    assert data.load_manifest(CXR_DIR)[:5] == records[:5]


def test_csv_paths_are_relative_to_the_csv_and_extra_columns_ignored(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    shutil.copy(FIXTURES / "cxnet__681.png", tmp_path / "img" / "a.png")
    rows = [
        {
            "file": "img/a.png",
            "label": "COVID",
            "patient_id": "",
            "source": "x",
            "view": "",
            "extra": "ignored",
        },
    ]
    path = _write_csv(
        tmp_path / "m.csv", rows, ["file", "label", "patient_id", "source", "view", "extra"]
    )
    (record,) = data.load_manifest(path)
    assert record.path == tmp_path / "img" / "a.png" and record.key == "img/a.png"
    assert (record.label, record.target, record.patient_id, record.view) == (
        "covid",
        1,
        None,
        "unknown",
    )


@pytest.mark.parametrize(
    ("fields", "rows", "message"),
    [
        (["file", "label", "source"], [], r"lacks column.*patient_id.*view"),
        (["file", "label", "patient_id", "source", "view"], [], "no images"),
        (
            ["file", "label", "patient_id", "source", "view"],
            [{"file": "nope.png", "label": "covid", "patient_id": "", "source": "", "view": ""}],
            "do not exist",
        ),
        (
            ["file", "label", "patient_id", "source", "view"],
            [{"file": "a.png", "label": "", "patient_id": "", "source": "", "view": ""}],
            "empty file or label",
        ),
    ],
)
def test_bad_csv_manifests(
    tmp_path: Path, fields: list[str], rows: list[dict], message: str
) -> None:
    path = _write_csv(tmp_path / "m.csv", rows, fields)
    with pytest.raises(ValueError, match=message):
        data.load_manifest(path)


def test_folder_layout(tmp_path: Path) -> None:
    for folder, names in {
        "COVID-19": ["hannover__0957ce54.png", "cxnet__681.png"],
        "normal": ["hannover__3a81faf3.png"],
    }.items():
        (tmp_path / folder).mkdir()
        for name in names:
            shutil.copy(FIXTURES / name, tmp_path / folder / name)
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    recs = data.load_manifest(tmp_path)
    assert [(r.key, r.label, r.target) for r in recs] == [
        ("COVID-19/cxnet__681.png", "covid", 1),
        ("COVID-19/hannover__0957ce54.png", "covid", 1),
        ("normal/hannover__3a81faf3.png", "normal", 0),
    ]
    assert {(r.source, r.patient_id, r.view) for r in recs} == {("folder", None, "unknown")}
    assert all(r.path.is_file() for r in recs)


def test_unknown_layouts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        data.load_manifest(tmp_path / "absent")
    with pytest.raises(ValueError, match="subfolder per class"):
        data.load_manifest(tmp_path)
    (tmp_path / "covid").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.load_manifest(tmp_path)


# --- splits ----------------------------------------------------------------------------------


def test_real_split_is_patient_disjoint(records: list[data.Record], split: dict) -> None:
    assert sorted(split) == ["test", "train", "val"]
    assert sorted(r.key for s in split.values() for r in s) == sorted(r.key for r in records)
    patients = {name: {r.patient_id for r in rs if r.patient_id} for name, rs in split.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    # The README: images without a patient id stay out of validation and test.
    assert all(r.patient_id for r in split["val"] + split["test"])
    assert sum(r.patient_id is None for r in split["train"]) == 600
    data.check_patient_disjoint(split)


def test_real_split_is_stratified(records: list[data.Record], split: dict) -> None:
    with_id = [r for r in records if r.patient_id]
    overall = np.mean([r.target for r in with_id])
    for name in ("val", "test"):
        share = len(split[name]) / len(with_id)
        assert abs(share - 0.15) < 0.02, (name, share)
        assert abs(np.mean([r.target for r in split[name]]) - overall) < 0.03
        # Stratified by source too: every source with patient ids is represented.
        assert {r.source for r in split[name]} >= {
            "hannover-mhh",
            "ieee8023-covid-chestxray",
            "kermany-pediatric",
            "nih-chestxray8-subset",
        }


def test_split_is_deterministic_per_seed(records: list[data.Record], split: dict) -> None:
    again = data.split_by_patient(records, seed=0)
    assert {k: [r.key for r in v] for k, v in again.items()} == {
        k: [r.key for r in v] for k, v in split.items()
    }
    other = data.split_by_patient(records, seed=1)
    assert {r.key for r in other["val"]} != {r.key for r in split["val"]}
    data.check_patient_disjoint(other)


def test_split_keeps_a_patients_images_together() -> None:
    recs = [
        _record(f"p{i}", target=i % 2, name=f"p{i}-{j}.png") for i in range(40) for j in range(3)
    ]
    split = data.split_by_patient(recs, 0.2, 0.2, seed=3)
    data.check_patient_disjoint(split)
    assert all(len(s) % 3 == 0 and len(s) > 0 for s in split.values())
    assert data.split_by_patient(recs, 0.2, 0.0)["test"] == []


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_bad_fractions(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        data.split_by_patient([_record("p")], val, test)


def test_check_patient_disjoint_catches_leaks() -> None:
    with pytest.raises(ValueError, match="both"):
        data.check_patient_disjoint(
            {"train": [_record("p", name="a")], "val": [_record("p", name="b")]}
        )
    with pytest.raises(ValueError, match="without a patient id"):
        data.check_patient_disjoint({"train": [], "test": [_record(None)]})


def test_summary_counts_without_identifiers(split: dict) -> None:
    summary = data.split_summary(split)
    for name, s in summary.items():
        assert s["images"] == len(split[name]) == sum(s["by_target"].values())
        assert sum(s["by_source"].values()) == sum(s["by_label"].values()) == s["images"]
        assert s["patients"] == len({r.patient_id for r in split[name] if r.patient_id})
    assert summary["val"]["images_without_patient_id"] == 0
    text = json.dumps(summary)
    assert not any(
        ns in text for ns in ("ieee8023:", "hannover:", "kermany:", "nihcxr8:", "linked:")
    )


def test_split_file_round_trip(tmp_path: Path, records: list[data.Record], split: dict) -> None:
    digest = data.write_split(split, tmp_path / "split.csv")
    assert digest == hashlib.sha256((tmp_path / "split.csv").read_bytes()).hexdigest()
    assert (tmp_path / "split.csv").read_text().splitlines()[0] == "file,split"
    assert data.read_split(tmp_path / "split.csv", records) == split
    assert data.write_split(split, tmp_path / "again.csv") == digest
    other = data.split_by_patient(records, seed=1)
    assert data.write_split(other, tmp_path / "other.csv") != digest


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["file,part", "a.png,train"], "columns"),
        (["file,split", "a.png,holdout"], "unknown split"),
        (["file,split", "zzz.png,train"], "not in the manifest"),
        (["file,split", "a.png,train", "a.png,val"], "twice"),
        (["file,split", "a.png,train", "b.png,val"], "both"),
    ],
)
def test_bad_split_files(tmp_path: Path, lines: list[str], message: str) -> None:
    recs = [_record("p", name="a.png"), _record("p", name="b.png")]
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        data.read_split(tmp_path / "s.csv", recs)


# --- sampling and cache ----------------------------------------------------------------------


def test_limit_per_class(records: list[data.Record]) -> None:
    kept = data.limit_per_class(records, 5)
    assert [r.target for r in kept].count(1) == 5 and [r.target for r in kept].count(0) == 5
    assert kept == [r for r in records if r in kept]  # manifest order kept


def test_class_weights_balance_the_classes() -> None:
    recs = [_record(f"p{i}", target=int(i < 3)) for i in range(12)]
    w = data.class_weights(recs)
    y = np.array([r.target for r in recs])
    assert w[y == 1].sum() == pytest.approx(w[y == 0].sum()) and w.sum() == pytest.approx(12)


def test_source_balanced_probabilities() -> None:
    recs = (
        [_record(f"a{i}", 1, "A") for i in range(30)]
        + [_record(f"b{i}", 1, "B") for i in range(5)]
        + [_record(f"c{i}", 0, "C") for i in range(60)]
        + [_record(f"d{i}", 1 - i % 2, "D") for i in range(10)]
    )
    p = data.source_balanced_probabilities(recs)
    assert p.sum() == pytest.approx(1.0)
    groups: dict = {}
    for r, pi in zip(recs, p, strict=True):
        groups[(r.target, r.source)] = groups.get((r.target, r.source), 0.0) + pi
    assert sum(v for (t, _), v in groups.items() if t == 1) == pytest.approx(0.5)
    assert groups[(1, "A")] == pytest.approx(groups[(1, "B")]) == pytest.approx(groups[(1, "D")])
    assert groups[(0, "C")] == pytest.approx(groups[(0, "D")]) == pytest.approx(0.25)


def test_epoch_order() -> None:
    a = data.epoch_order(50, epoch=3, seed=0)
    assert sorted(a) == list(range(50)) and a.dtype == np.int32
    np.testing.assert_array_equal(a, data.epoch_order(50, epoch=3, seed=0))
    assert not np.array_equal(a, data.epoch_order(50, epoch=4, seed=0))
    p = np.zeros(50)
    p[7] = 1.0
    assert set(data.epoch_order(50, 0, 0, p)) == {7}


def test_gray_cache_is_exactly_the_serving_preprocessing(records: list[data.Record]) -> None:
    sample = records[:2] + records[-2:]
    gray = data.load_gray_images(sample, 48)
    assert gray.shape == (4, 48, 48) and gray.dtype == np.float32
    for g, r in zip(gray, sample, strict=True):
        pixels = decode_image(r.path.read_bytes()).pixels
        np.testing.assert_array_equal(to_caffe(g), preprocess(pixels, 48))
    assert not np.array_equal(data.load_gray_images(sample[:1], 48, version="1")[0], gray[0])


def test_gray_cache_names_the_broken_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        data.load_gray_images([_record("p", name=str(tmp_path / "bad.png"))], 32)
