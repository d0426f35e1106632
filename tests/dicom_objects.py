"""DICOM chest X-rays made on the spot from the shared PNGs (never committed), and bad objects.

What a modality or PACS would send: a DX image with a patient, a study and a series,
with made-up identifiers the tests then look for where they must (and must not) be.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
PATIENT = {"PatientName": "Quixote^Alonso", "PatientID": "MRN-0042",
           "PatientBirthDate": "19470921", "PatientSex": "M", "AccessionNumber": "ACC-7781",
           "ReferringPhysicianName": "Panza^Sancho", "StudyID": "S-1"}


def new_study() -> dict[str, str]:
    """Fresh UIDs of a study and its series."""
    return {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}


def _base(sop_class: str, study: dict[str, str], patient: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.preamble = b"\0" * 128
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.SeriesInstanceUID = study["SeriesInstanceUID"]
    ds.StudyDate, ds.StudyTime = "20261130", "101500"
    for keyword, value in patient.items():
        setattr(ds, keyword, value)
    return ds


def cxr_dataset(png: Path, study: dict[str, str], *, view: str = "PA", frames: int = 1,
                patient: dict[str, str] | None = None) -> Dataset:
    """A 12-bit DX image of the PNG's pixels (repeated `frames` times for a multi-frame object)."""
    ds = _base(DX_FOR_PRESENTATION, study, PATIENT if patient is None else patient)
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", view, "CHEST"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    gray = np.asarray(PILImage.open(png).convert("L"), dtype=np.uint16) * 16
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.tile(gray, (frames, 1)).tobytes()
    return ds


def report_dataset(study: dict[str, str]) -> Dataset:
    """A Basic Text SR: a valid DICOM object that is not an image."""
    ds = _base(BASIC_TEXT_SR, study, PATIENT)
    ds.Modality, ds.ValueType = "SR", "CONTAINER"
    return ds


def truncated_dataset(png: Path, study: dict[str, str]) -> Dataset:
    """An image whose pixel data stops half-way (a transfer cut short)."""
    ds = cxr_dataset(png, study)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


def encode(ds: Dataset) -> bytes:
    """A dataset as a Part 10 file."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
