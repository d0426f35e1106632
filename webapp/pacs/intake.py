"""DICOM objects received from the PACS -> studies, through the upload's own steps.

Each object is checked on arrival (`webapp.uploads.check_image`: the upload's limits and
error codes), de-identified per STORE_DICOM_IDENTIFIERS with one UID mapping per study
(`deidentify_image`), and joins the pending study of its StudyInstanceUID; `store`
writes a pending study with `webapp.uploads.store_study`, which queues it like an upload,
together with its `dicom_origins` row (the original identifiers, kept until the results
are back). The listener and STOW-RS differ only in when they call `store`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from typing import Any

import pydicom
from flask import current_app

from ml.imaging import DICOM
from webapp.deidentify import StudyDeidentifier
from webapp.extensions import db
from webapp.models import Study, utcnow
from webapp.pacs import identity
from webapp.pacs.models import DicomOrigin
from webapp.uploads import (
    CheckedImage,
    UploadError,
    check_image,
    deidentify_image,
    image_limits,
    store_study,
)

# Storage Service failure statuses (PS3.4 B.2.3): Cxxx "cannot understand" for input the
# upload would refuse too, one value per upload error code; A7xx "out of resources" when
# the service, not the object, is at fault (the sender may try again).
STATUS_BY_CODE: dict[str, int] = {
    "unsupported_format": 0xC001,
    "empty_file": 0xC001,
    "corrupt_image": 0xC002,
    "multi_frame": 0xC003,
    "dicom_no_pixel_data": 0xC004,
    "dicom_unsupported": 0xC005,
    "too_large_bytes": 0xC006,
    "too_many_pixels": 0xC006,
    "bad_dimensions": 0xC007,
    "deidentification_failed": 0xC008,
    "missing_uid": 0xC009,
    "too_many_files": 0xA701,
}
INPUT_ERROR = 0xC000
OUT_OF_RESOURCES = 0xA700


@dataclass
class PendingStudy:
    """The accepted objects of one StudyInstanceUID, not stored yet."""

    study_uid: str
    via: str  # "dimse" or "stow"
    calling_ae: str | None
    identifiers: dict[str, Any]  # identity.capture of the first object
    deidentifier: StudyDeidentifier = field(default_factory=StudyDeidentifier)
    images: list[CheckedImage] = field(default_factory=list)
    references: list[dict[str, str]] = field(default_factory=list)
    first_received_at: datetime = field(default_factory=utcnow)
    last_received_at: datetime = field(default_factory=utcnow)
    last_monotonic: float = field(default_factory=time.monotonic)
    reserved: int = 0  # objects of this study being checked right now


@dataclass(frozen=True)
class Arrival:
    """An object that passed the checks: its stored form and its original identifiers."""

    study_uid: str
    item: CheckedImage
    identifiers: dict[str, Any]
    reference: dict[str, str]


def check(name: str, data: bytes) -> Arrival:
    """Validate one received object as an upload would be; UploadError with the upload's code."""
    item = check_image(name, data, image_limits())
    if item.image.media_type != DICOM:
        raise UploadError(415, "unsupported_format", f"{name}: only DICOM objects are accepted here")
    try:
        header = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # decode_image read it; a header it cannot re-read is damaged
        raise UploadError(422, "corrupt_image", f"{name}: the DICOM header could not be read") from exc
    study_uid = str(header.get("StudyInstanceUID", "")).strip()
    if not study_uid or "SOPInstanceUID" not in header or "SOPClassUID" not in header:
        raise UploadError(422, "missing_uid",
                          f"{name}: the object has no Study Instance UID, SOP Instance UID or SOP Class UID")
    return Arrival(study_uid, item, identity.capture(header), identity.image_reference(header))


def admit(pending: PendingStudy, arrival: Arrival) -> None:
    """De-identify (per the setting) and add an object to its pending study; UploadError if it cannot be."""
    position = len(pending.images)
    item = arrival.item
    if not current_app.config["STORE_DICOM_IDENTIFIERS"]:
        item = deidentify_image(pending.deidentifier, item, position)
    pending.images.append(item)
    pending.references.append(arrival.reference)
    pending.last_received_at = utcnow()
    pending.last_monotonic = time.monotonic()


def check_room(pending: PendingStudy) -> None:
    """UploadError too_many_files when the study already holds MAX_FILES_PER_STUDY objects."""
    max_files = current_app.config["MAX_FILES_PER_STUDY"]
    if len(pending.images) + pending.reserved >= max_files:
        raise UploadError(400, "too_many_files", f"a study holds at most {max_files} images")


def store(pending: PendingStudy, owner_id: int | None) -> Study:
    """Store a pending study and its origin in one transaction, then queue it (as an upload)."""

    def add_origin(study: Study) -> None:
        db.session.add(DicomOrigin(
            study_id=study.id, via=pending.via, calling_ae=pending.calling_ae,
            first_received_at=pending.first_received_at,
            last_received_at=pending.last_received_at,
            identifiers={"study": pending.identifiers, "images": pending.references},
        ))

    return store_study(pending.images, owner_id=owner_id, before_commit=add_origin)
