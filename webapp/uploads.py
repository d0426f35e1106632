"""Turn an upload (files + optional references) into a stored, queued study, or a clear error.

`create_study` is the web upload; the DICOM listener and STOW-RS (webapp/pacs/) use its
steps one by one (`check_image`, `deidentify_image`, `store_study`), so every way in has
the same limits, errors, de-identification and queuing.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from flask import current_app
from werkzeug.datastructures import FileStorage
from werkzeug.utils import secure_filename

from ml.artifact import ArtifactError, current_metadata
from ml.imaging import DICOM, DecodedImage, ImageError, Limits, decode_image
from ml.prepared import encode, input_key, prepare
from webapp import jobs
from webapp.broker import enqueue_study
from webapp.deidentify import DeidentificationError, StudyDeidentifier
from webapp.extensions import db
from webapp.models import Image, PreparedInput, Study

log = logging.getLogger(__name__)

# HTTP status for each intake error code; anything not listed is 422.
IMAGE_ERROR_STATUS = {
    "unsupported_format": 415,
    "too_large_bytes": 413,
    "too_many_pixels": 413,
}
REFERENCE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._/\-]{0,63}$")


class UploadError(Exception):
    """A rejected upload: HTTP status, machine code and a message for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class CheckedImage:
    """One file that passed decode_image: its name, the bytes to store and what was decoded."""

    filename: str
    data: bytes
    image: DecodedImage


def _clean_reference(value: str | None, field: str) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    if not REFERENCE_PATTERN.match(value):
        raise UploadError(
            422,
            f"invalid_{field}",
            f"{field} must be 1-64 letters, digits, spaces or . _ / - characters",
        )
    return value


def _display_name(upload: FileStorage, position: int) -> str:
    # The name is only shown back to the user; it never becomes a path.
    name = secure_filename(upload.filename or "")[:200]
    return name or f"image-{position + 1}"


def image_limits() -> Limits:
    """The per-image limits of the current app's settings."""
    return Limits(
        max_bytes=current_app.config["MAX_IMAGE_BYTES"],
        max_pixels=current_app.config["MAX_IMAGE_PIXELS"],
    )


def check_image(name: str, data: bytes, limits: Limits) -> CheckedImage:
    """Decode and validate one file; UploadError with the upload's HTTP status and code if unusable."""
    try:
        image = decode_image(data, limits)
    except ImageError as exc:
        status = IMAGE_ERROR_STATUS.get(exc.code, 422)
        raise UploadError(status, exc.code, f"{name}: {exc.message}") from exc
    return CheckedImage(name, data, image)


def _check_file(upload: FileStorage, position: int, limits: Limits) -> CheckedImage:
    return check_image(_display_name(upload, position), upload.read(limits.max_bytes + 1), limits)


def deidentify_image(
    deidentifier: StudyDeidentifier, item: CheckedImage, position: int = 0
) -> CheckedImage:
    """A DICOM file with the PS3.15 Basic Profile applied (others unchanged); UploadError 422 if it cannot be."""
    if item.image.media_type != DICOM:
        return item
    try:
        data = deidentifier.deidentify(item.data)
    except DeidentificationError as exc:
        log.warning("event=deidentification_failed position=%d cause=%s", position, exc.cause)
        raise UploadError(
            422, "deidentification_failed", f"{item.filename}: {exc.message}; nothing was stored"
        ) from None
    # Decoded from the original: the check in deidentify() proves the pixels are the same.
    attributes = {**item.image.attributes, "PatientIdentityRemoved": "YES"}
    return replace(item, data=data, image=replace(item.image, attributes=attributes))


def _deidentify_dicoms(checked: list[CheckedImage]) -> list[CheckedImage]:
    """Apply the PS3.15 Basic Profile to every DICOM file, with one UID mapping per upload."""
    deidentifier = StudyDeidentifier()
    return [deidentify_image(deidentifier, item, position) for position, item in enumerate(checked)]


def create_study(
    files: Sequence[FileStorage],
    patient_ref: str | None = None,
    accession: str | None = None,
    owner_id: int | None = None,
) -> Study:
    """Validate every file, then store the study and its images and enqueue it; all or nothing."""
    # Browsers send one empty, unnamed part for an untouched file input.
    files = [f for f in files if f is not None and f.filename]
    if not files:
        raise UploadError(400, "no_files", "attach at least one image in the 'files' field")
    max_files = current_app.config["MAX_FILES_PER_STUDY"]
    if len(files) > max_files:
        raise UploadError(400, "too_many_files", f"a study holds at most {max_files} images")
    patient_ref = _clean_reference(patient_ref, "patient_ref")
    accession = _clean_reference(accession, "accession")
    limits = image_limits()
    checked = [_check_file(upload, i, limits) for i, upload in enumerate(files)]
    if not current_app.config["STORE_DICOM_IDENTIFIERS"]:
        checked = _deidentify_dicoms(checked)
    return store_study(checked, patient_ref=patient_ref, accession=accession, owner_id=owner_id)


def _prepared_inputs(checked: Sequence[CheckedImage]) -> list[PreparedInput | None]:
    """Each image's model input for the installed model (ml/prepared.py), made now that it is
    decoded, so the worker need not decode it again; None where there is no model to ask."""
    if not current_app.config["PREPARE_INPUTS"]:
        return [None] * len(checked)
    try:
        meta = current_metadata(current_app.config["MODEL_DIR"])
    except ArtifactError:
        return [None] * len(checked)  # this host has no model: the worker decodes
    key = input_key(meta)
    return [PreparedInput(key=key, data=encode(prepare(i.image.pixels, i.image.attributes, meta)))
            for i in checked]


def store_study(
    checked: Sequence[CheckedImage],
    *,
    patient_ref: str | None = None,
    accession: str | None = None,
    owner_id: int | None = None,
    before_commit: Callable[[Study], None] | None = None,
) -> Study:
    """Store checked images as one QUEUED study in one transaction, then enqueue it.

    `before_commit` adds rows that must commit with the study (the DICOM listener's
    record of where the study came from), so a worker never sees one without the other.
    """
    study = Study(owner_id=owner_id, patient_ref=patient_ref, accession=accession)
    jobs.start_queued(study)
    prepared = _prepared_inputs(checked)
    for position, item in enumerate(checked):
        study.images.append(
            Image(
                position=position,
                filename=item.filename,
                media_type=item.image.media_type,
                size_bytes=len(item.data),
                sha256=hashlib.sha256(item.data).hexdigest(),
                width=item.image.width,
                height=item.image.height,
                bit_depth=item.image.bit_depth,
                attributes=item.image.attributes,
                data=item.data,
                prepared=prepared[position],
            )
        )
    db.session.add(study)
    if before_commit is not None:
        db.session.flush()  # the study id, for rows that point at it
        before_commit(study)
    db.session.commit()
    log.info("event=study_created study=%s images=%d", study.id, len(checked))
    enqueue_study(study.id)
    return study
