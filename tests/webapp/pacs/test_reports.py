"""The structured report and the heatmap secondary captures sent back to the PACS (pydicom only)."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pydicom
from PIL import Image as PILImage
from pydicom.dataset import Dataset

from webapp.pacs import identity, reports

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2"


def _original(n: int) -> Dataset:
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientSex = "Müller^Jörg", "MRN-0042", "M"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
    ds.AccessionNumber, ds.StudyDate = "ACC-7781", "20261130"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.3.{n}"
    return ds


def _png() -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (320, 300), (180, 40, 40)).save(out, format="PNG")
    return out.getvalue()


def results(study_id: str = "3b8e1a8c-0000-4000-8000-000000000001") -> reports.StudyResults:
    common = {"model_version": "resnet50-cxr-test", "model_sha256": "ab" * 32, "model_trained": True}
    return reports.StudyResults(study_id, datetime(2026, 11, 30, 12, 0, tzinfo=UTC),
                                identity.capture(_original(0)), [
        reports.ImageResult(0, identity.image_reference(_original(0)), 0.8123, "covid", 0.42,
                            None, None, _png(), **common),
        reports.ImageResult(1, identity.image_reference(_original(1)), 0.31, "indeterminate", 0.42,
                            "not_frontal", "the image looks like a lateral view", None, **common),
    ])


def _roundtrip(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(reports.encode(ds)))


def _flatten(items) -> list[Dataset]:
    out = []
    for item in items:
        out.append(item)
        out += _flatten(item.get("ContentSequence", []))
    return out


def _named(items: list[Dataset], code: str) -> list[Dataset]:
    return [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == code]


def test_the_report_files_with_the_original_patient_and_study_in_a_new_series():
    report, heatmap = (_roundtrip(ds) for ds in reports.build_all(results()))
    for ds in (report, heatmap):
        assert str(ds.PatientName) == "Müller^Jörg" and ds.PatientID == "MRN-0042"
        assert ds.StudyInstanceUID == STUDY_UID and ds.AccessionNumber == "ACC-7781"
        assert ds.SeriesInstanceUID != SERIES_UID and ds.SpecificCharacterSet == "ISO_IR 192"
    assert report.SOPClassUID == reports.COMPREHENSIVE_SR and report.Modality == "SR"
    assert heatmap.SOPClassUID == reports.SECONDARY_CAPTURE
    assert len({report.SeriesInstanceUID, heatmap.SeriesInstanceUID}) == 2
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == STUDY_UID
    assert [s.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence] \
        == [_original(0).SOPInstanceUID, _original(1).SOPInstanceUID]


def test_the_report_says_probability_label_threshold_model_and_research_use_or_why_it_abstained():
    report = _roundtrip(reports.build_report(results()))
    items = _flatten(report.ContentSequence)
    assert [i.TextValue for i in _named(items, "121106")] == [reports.NOTICE]
    assert _named(items, "111003")[0].TextValue == "resnet50-cxr-test"
    assert _named(items, "MODEL_SHA256")[0].TextValue == "ab" * 32
    read, abstained = _named(items, "IMAGE_RESULT")
    read_items, abstained_items = read.ContentSequence, abstained.ContentSequence
    assert float(_named(read_items, "PROB_COVID19")[0].MeasuredValueSequence[0].NumericValue) == 0.8123
    assert float(_named(read_items, "THRESHOLD")[0].MeasuredValueSequence[0].NumericValue) == 0.42
    assert _named(read_items, "TRIAGE_LABEL")[0].ConceptCodeSequence[0].CodeValue == "COVID19_FLAGGED"
    # No reading for an abstention: the label says so, the reason is given, no probability.
    assert _named(abstained_items, "PROB_COVID19") == []
    assert _named(abstained_items, "TRIAGE_LABEL")[0].ConceptCodeSequence[0].CodeValue == "INDETERMINATE"
    assert _named(abstained_items, "ABSTAIN_REASON")[0].TextValue.startswith("not_frontal: ")
    assert report.VerificationFlag == "UNVERIFIED" and report.CompletionFlag == "COMPLETE"


def test_one_secondary_capture_per_heatmap_with_the_notice_above_the_overlay():
    objects = reports.build_all(results())
    assert len(objects) == 2  # the abstained image has no heatmap
    heatmap = _roundtrip(objects[1])
    pixels = heatmap.pixel_array
    assert heatmap.PhotometricInterpretation == "RGB" and pixels.shape[1:] == (320, 3)
    assert pixels.shape[0] > 300  # the band above the overlay
    assert tuple(pixels[-1, -1]) == (180, 40, 40)
    assert heatmap.SourceImageSequence[0].ReferencedSOPInstanceUID == _original(0).SOPInstanceUID
    assert reports.NOTICE in heatmap.ImageComments and heatmap.BurnedInAnnotation == "NO"


def test_uids_are_the_same_for_the_same_study_and_differ_between_studies():
    first = [ds.SOPInstanceUID for ds in reports.build_all(results())]
    again = [ds.SOPInstanceUID for ds in reports.build_all(results())]
    other = [ds.SOPInstanceUID for ds in reports.build_all(results("another-study"))]
    assert first == again and not set(first) & set(other)
    assert all(uid.startswith("2.25.") and len(uid) <= 64 for uid in first + other)
