"""De-identify DICOM uploads before they are stored (DICOM PS3.15 Basic Application Level
Confidentiality Profile), with one UID mapping per uploaded study.

The library is dicom-anonymizer (Kitware): it applies the Basic Profile column of PS3.15
Table E.1-1 attribute by attribute, from a table regenerated from the standard
(``dicomfields_2026c``), replaces instance UIDs consistently and removes private tags.
dicognito was measured too: it swaps names, IDs and UIDs for plausible fakes but does not
follow the table (study descriptions, patient comments and device serial numbers survive),
and deid's default recipe deletes every UID instead of remapping it. Only the web process
stores uploads, so the slim worker install does without the library: it is imported lazily.

Burned-in text in the pixels is out of scope: pixel data is stored byte for byte.
"""

from __future__ import annotations

import threading
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset

PROFILE_TABLE = "dicomfields_2026c"
# LO, at most 64 characters; the code sequence below says the same in DICOM's words.
METHOD = "DICOM PS3.15 Basic Profile (dicom-anonymizer 2.1.0)"
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
# dicom-anonymizer keeps its old -> new UID mapping in a module global; each upload
# swaps in its own under this lock so studies never share (or leak) a mapping.
_UID_MAPPING_LOCK = threading.Lock()


class DeidentificationError(ValueError):
    """A DICOM file that could not be de-identified; nothing in it quotes the file's content."""

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause  # an exception class name, for the log


class StudyDeidentifier:
    """De-identifies the DICOM files of one upload, sharing one UID mapping among them."""

    def __init__(self) -> None:
        self._uids: dict[str, str] = {}

    def deidentify(self, data: bytes) -> bytes:
        """Return the Part 10 bytes with the Basic Profile applied and pixel data unchanged."""
        try:
            before = pydicom.dcmread(BytesIO(data))
            after = pydicom.dcmread(BytesIO(data))
            self._apply_profile(after)
            out = BytesIO()
            after.save_as(out, enforce_file_format=True)
            stored = out.getvalue()
            _check_pixels_unchanged(before, pydicom.dcmread(BytesIO(stored)))
        except MemoryError:
            raise
        except DeidentificationError:
            raise
        except Exception as exc:
            # The exception text may quote element values: only its type travels on.
            raise DeidentificationError(
                "the DICOM header could not be de-identified", type(exc).__name__
            ) from None
        return stored

    def _apply_profile(self, ds: Dataset) -> None:
        from dicomanonymizer import simpledicomanonymizer as profile

        with _UID_MAPPING_LOCK:
            profile.dictionary = self._uids
            try:
                profile.anonymize_dataset(
                    ds,
                    delete_private_tags=True,
                    base_rules_gen=lambda: profile.initialize_actions(PROFILE_TABLE),
                )
            finally:
                profile.dictionary = {}
        # The preamble and the file meta's optional elements (source AE titles,
        # private information) are outside the table; keep only what a reader needs.
        ds.preamble = b"\0" * 128
        ds.file_meta = _minimal_file_meta(ds)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = [code]


def _minimal_file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.file_meta.get("MediaStorageSOPClassUID") or ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    return meta


def _pixel_module(ds: Dataset) -> tuple[Any, ...]:
    # Group 0028 holds everything that says how to read the pixels (size, depth,
    # photometric interpretation, rescale, windows, LUTs).
    return (ds.group_dataset(0x0028), ds.file_meta.TransferSyntaxUID, ds.get("PixelData"))


def _check_pixels_unchanged(before: Dataset, after: Dataset) -> None:
    if _pixel_module(before) != _pixel_module(after):
        raise DeidentificationError("de-identification would have changed the image", "pixels")
