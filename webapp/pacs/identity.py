"""The identifiers a result needs to file with the right patient in the PACS, kept from the original.

The service stores what the de-identification setting says (webapp/deidentify.py), but
what it returns must carry the patient's original identifiers and the original Study
Instance UID. `capture` takes them from the object as received, before de-identification;
they live in `dicom_origins.identifiers` until the results are delivered, and
`apply` writes them into each outgoing object.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

# Patient and General Study modules: what a PACS matches a new series on.
KEPT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
# Type 2 in the Patient and General Study modules: present, even if empty.
REQUIRED_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                  "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def capture(ds: Dataset) -> dict[str, Any]:
    """The kept patient and study attributes of an original object, as DICOM JSON."""
    kept = Dataset()
    for keyword in KEPT_KEYWORDS:
        if keyword in ds:
            kept[keyword] = ds[keyword]
    # Values were decoded with the original character set; they are written back as UTF-8.
    return kept.to_json_dict()


def image_reference(ds: Dataset) -> dict[str, str]:
    """An original image's SOP class, SOP instance and series UIDs: what the report points at."""
    return {
        "sop_class_uid": str(ds.SOPClassUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
    }


def apply(ds: Dataset, study_identifiers: dict[str, Any]) -> None:
    """Write the kept patient and study attributes into an outgoing object (UTF-8)."""
    kept = Dataset.from_json(study_identifiers)
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in REQUIRED_EMPTY:
        setattr(ds, keyword, "")
    for element in kept:
        ds[element.tag] = element
