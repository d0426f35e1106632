"""What goes back to the PACS: a Comprehensive SR of a study's results and a Secondary Capture of
each heatmap overlay, in the original study (new series, new SOP instances). pydicom only.

Every UID made here is derived from the study id (a name-based UUID under 2.25), so sending
the same study's results again produces the same instances, which a PACS stores once.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from webapp.pacs import identity

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
NOTICE = "Research use only. Not for diagnosis."
MANUFACTURER = "covid-cxr triage service"
REPORT_SERIES_NUMBER = 9901
HEATMAP_SERIES_NUMBER = 9902
_UID_NAMESPACE = uuid.UUID("3f0c9b7e-5d1a-4a37-9f3e-2b8c6c0d7a51")
# Codes of our own (a private coding scheme, PS3.16 8.2: "99" prefix) where DICOM has none.
SCHEME = "99COVIDCXR"
TITLE = ("18748-4", "LN", "Diagnostic imaging report")
COMMENT = ("121106", "DCM", "Comment")
ALGORITHM_NAME = ("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = ("111003", "DCM", "Algorithm Version")
SOURCE = ("121112", "DCM", "Source of Measurement")
IMAGE_RESULT = ("IMAGE_RESULT", SCHEME, "Result for one image")
PROBABILITY = ("PROB_COVID19", SCHEME, "COVID-19 probability")
THRESHOLD = ("THRESHOLD", SCHEME, "Decision threshold")
TRIAGE_LABEL = ("TRIAGE_LABEL", SCHEME, "Triage label at the decision threshold")
ABSTAIN_REASON = ("ABSTAIN_REASON", SCHEME, "Reason no reading is given")
MODEL_SHA256 = ("MODEL_SHA256", SCHEME, "Model weights SHA-256")
MODEL_TRAINED = ("MODEL_TRAINED", SCHEME, "Model trained")
LABELS = {
    "covid": ("COVID19_FLAGGED", SCHEME, "COVID-19 flagged"),
    "non-covid": ("COVID19_NOT_FLAGGED", SCHEME, "COVID-19 not flagged"),
    "indeterminate": ("INDETERMINATE", SCHEME, "Indeterminate: no reading given"),
}
NO_UNITS = ("1", "UCUM", "no units")


@dataclass(frozen=True)
class ImageResult:
    """One image's result, with the original image it came from."""

    position: int
    reference: dict[str, str] | None  # identity.image_reference of the original, if known
    probability_covid: float
    label: str
    threshold: float
    abstain_reason: str | None
    abstain_message: str | None
    heatmap_png: bytes | None
    model_version: str
    model_sha256: str
    model_trained: bool


@dataclass(frozen=True)
class StudyResults:
    """Everything the report and the heatmaps need; no database access past this point."""

    study_id: str
    finished_at: datetime
    identifiers: dict  # identity.capture of the original study (DICOM JSON)
    images: Sequence[ImageResult]


def derived_uid(study_id: str, role: str) -> str:
    """A UID that is the same for the same study and role (name-based UUID, PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{study_id}/{role}').int}"


def build_all(results: StudyResults) -> list[Dataset]:
    """The report, then one Secondary Capture per image with a heatmap."""
    heatmaps = [build_heatmap(results, image) for image in results.images if image.heatmap_png]
    return [build_report(results), *heatmaps]


def _code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def _item(relationship: str, value_type: str, concept: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code(concept)]
    return item


def _text(concept: tuple[str, str, str], text: str) -> Dataset:
    item = _item("CONTAINS", "TEXT", concept)
    item.TextValue = text
    return item


def _num(concept: tuple[str, str, str], value: float) -> Dataset:
    item = _item("CONTAINS", "NUM", concept)
    measured = Dataset()
    measured.NumericValue = f"{value:.6f}"[:16]
    measured.MeasurementUnitsCodeSequence = [_code(NO_UNITS)]
    item.MeasuredValueSequence = [measured]
    return item


def _coded(concept: tuple[str, str, str], value: tuple[str, str, str]) -> Dataset:
    item = _item("CONTAINS", "CODE", concept)
    item.ConceptCodeSequence = [_code(value)]
    return item


def _image_ref(reference: dict[str, str]) -> Dataset:
    item = _item("CONTAINS", "IMAGE", SOURCE)
    sop = Dataset()
    sop.ReferencedSOPClassUID = reference["sop_class_uid"]
    sop.ReferencedSOPInstanceUID = reference["sop_instance_uid"]
    item.ReferencedSOPSequence = [sop]
    return item


def _image_container(image: ImageResult) -> Dataset:
    container = _item("CONTAINS", "CONTAINER", IMAGE_RESULT)
    container.ContinuityOfContent = "SEPARATE"
    content = [_image_ref(image.reference)] if image.reference else []
    if image.abstain_reason is None:
        # An abstention gives no reading: its probability stays in the service's database only.
        content.append(_num(PROBABILITY, image.probability_covid))
    content.append(_num(THRESHOLD, image.threshold))
    content.append(_coded(TRIAGE_LABEL, LABELS.get(image.label, LABELS["indeterminate"])))
    if image.abstain_reason is not None:
        words = image.abstain_message or image.abstain_reason
        content.append(_text(ABSTAIN_REASON, f"{image.abstain_reason}: {words}"))
    container.ContentSequence = content
    return container


def _evidence(results: StudyResults, study_uid: str) -> list[Dataset]:
    """CurrentRequestedProcedureEvidenceSequence: the original images, by series."""
    by_series: dict[str, list[dict[str, str]]] = {}
    for image in results.images:
        if image.reference:
            by_series.setdefault(image.reference["series_instance_uid"], []).append(image.reference)
    if not by_series:
        return []
    series_items = []
    for series_uid, refs in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        sops = []
        for ref in refs:
            sop = Dataset()
            sop.ReferencedSOPClassUID = ref["sop_class_uid"]
            sop.ReferencedSOPInstanceUID = ref["sop_instance_uid"]
            sops.append(sop)
        series.ReferencedSOPSequence = sops
        series_items.append(series)
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = series_items
    return [study]


def _common(ds: Dataset, results: StudyResults, sop_class: str, role: str, modality: str,
            series_number: int, series_description: str) -> None:
    """Patient, study, series, equipment and SOP common attributes, and the file meta."""
    identity.apply(ds, results.identifiers)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = derived_uid(results.study_id, role)
    ds.SeriesInstanceUID = derived_uid(results.study_id, f"series-{modality}")
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Manufacturer = MANUFACTURER
    when = results.finished_at
    ds.InstanceCreationDate = ds.ContentDate = ds.SeriesDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = ds.SeriesTime = when.strftime("%H%M%S")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128


def build_report(results: StudyResults) -> Dataset:
    """The Comprehensive SR: notice, algorithm, then each image's probability, label or abstain reason."""
    ds = Dataset()
    first = results.images[0]
    _common(ds, results, COMPREHENSIVE_SR, "report", "SR", REPORT_SERIES_NUMBER,
            "AI COVID-19 triage report (research use only)")
    ds.SoftwareVersions = first.model_version[:64]
    ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code(TITLE)]
    ds.ContinuityOfContent = "SEPARATE"
    evidence = _evidence(results, str(ds.StudyInstanceUID))
    if evidence:
        ds.CurrentRequestedProcedureEvidenceSequence = evidence
    content = [
        _text(COMMENT, NOTICE),
        _text(ALGORITHM_NAME, MANUFACTURER),
        _text(ALGORITHM_VERSION, first.model_version),
        _text(MODEL_SHA256, first.model_sha256),
        _text(MODEL_TRAINED, "yes" if first.model_trained
              else "NO: an untrained development model; its output means nothing"),
    ]
    content += [_image_container(image) for image in results.images]
    ds.ContentSequence = content
    return ds


def _caption(image: ImageResult) -> str:
    if image.abstain_reason is not None:
        return f"No reading: {image.abstain_reason}"
    return (f"p(COVID-19) {image.probability_covid:.2f}  label {image.label} "
            f"at threshold {image.threshold:.2f}")


def _with_banner(png: bytes, lines: list[str]) -> np.ndarray:
    """The overlay with a black band above it carrying the notice and the reading: RGB uint8."""
    overlay = Image.open(io.BytesIO(png)).convert("RGB")
    size = max(11, overlay.width // 40)
    font = ImageFont.load_default(size=size)
    band = (size + 4) * len(lines) + 6
    canvas = Image.new("RGB", (overlay.width, overlay.height + band), (0, 0, 0))
    canvas.paste(overlay, (0, band))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((4, 3 + row * (size + 4)), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def build_heatmap(results: StudyResults, image: ImageResult) -> Dataset:
    """A Secondary Capture of one image's heatmap overlay, its reading and the notice burned in above it."""
    ds = Dataset()
    _common(ds, results, SECONDARY_CAPTURE, f"heatmap-{image.position}", "OT",
            HEATMAP_SERIES_NUMBER, "AI COVID-19 heatmaps (research use only)")
    ds.ConversionType = "WSD"
    ds.InstanceNumber = image.position + 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"  # the band holds the notice and the reading, no identifiers
    ds.LossyImageCompression = "00"
    ds.DerivationDescription = f"Grad-CAM heatmap of model {image.model_version}"[:1024]
    ds.ImageComments = f"{NOTICE} {_caption(image)}"
    if image.reference:
        source = Dataset()
        source.ReferencedSOPClassUID = image.reference["sop_class_uid"]
        source.ReferencedSOPInstanceUID = image.reference["sop_instance_uid"]
        ds.SourceImageSequence = [source]
    pixels = _with_banner(image.heatmap_png or b"", [f"AI heatmap. {NOTICE}", _caption(image)])
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def encode(ds: Dataset) -> bytes:
    """A built object as a DICOM Part 10 file."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
