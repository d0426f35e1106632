"""DICOMweb STOW-RS: `POST /dicomweb/studies` (multipart/related; type="application/dicom").

For systems that push over HTTP with a personal API token. Each part goes through the
listener's intake (webapp/pacs/intake.py: the upload's checks, de-identification,
queuing); the parts of one request that share a StudyInstanceUID become one study owned
by the token's account. The answer is the standard DICOM JSON: ReferencedSOPSequence for
stored objects, FailedSOPSequence with a FailureReason (the listener's status) for the rest.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pydicom
from flask import Blueprint, jsonify, request, url_for
from flask_login import current_user

from webapp import audit
from webapp.errors import api_error
from webapp.extensions import csrf
from webapp.pacs import intake
from webapp.pacs.multipart import DICOM_TYPE, MultipartError, content_type_params, decode_related
from webapp.uploads import UploadError

bp = Blueprint("dicomweb", __name__, url_prefix="/dicomweb")
# Token clients need no CSRF token; cookie-session writes are checked in webapp/security.py.
csrf.exempt(bp)

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"
SOP_CLASS = "00081150"
SOP_INSTANCE = "00081155"
MISMATCH = 0xA900  # Data Set does not match: another study than the URL names


def _sop_item(reference: dict[str, str], reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if reference.get("sop_class_uid"):
        item[SOP_CLASS] = {"vr": "UI", "Value": [reference["sop_class_uid"]]}
    if reference.get("sop_instance_uid"):
        item[SOP_INSTANCE] = {"vr": "UI", "Value": [reference["sop_instance_uid"]]}
    if reason is not None:
        item[FAILURE_REASON] = {"vr": "US", "Value": [reason]}
    return item


def _uids_of(data: bytes) -> dict[str, str]:
    """The SOP UIDs of a refused part, if its header can be read at all."""
    try:
        header = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=True)
        return {"sop_class_uid": str(header.get("SOPClassUID", "")),
                "sop_instance_uid": str(header.get("SOPInstanceUID", ""))}
    except Exception:
        return {}


@bp.post("/studies")
@bp.post("/studies/<study_uid>")
def store_instances(study_uid: str | None = None) -> Any:
    """Store DICOM objects: 200 all stored, 202 some refused, 409 none stored (PS3.18 10.5)."""
    media_type, params = content_type_params(request.content_type or "")
    if media_type != "multipart/related" or params.get("type", DICOM_TYPE).lower() != DICOM_TYPE:
        return api_error(415, "unsupported_media_type",
                         'send multipart/related; type="application/dicom" parts')
    try:
        parts = decode_related(request.get_data(), request.content_type or "")
    except MultipartError as exc:
        return api_error(400, "bad_multipart", str(exc))
    if not parts:
        return api_error(400, "no_files", "the request holds no DICOM part")
    pending: dict[str, intake.PendingStudy] = {}
    referenced, failed, reasons = [], [], set()
    for n, (part_type, data) in enumerate(parts):
        try:
            if content_type_params(part_type)[0] != DICOM_TYPE:
                raise UploadError(415, "unsupported_format", f"part {n + 1}: not application/dicom")
            arrival = intake.check(f"part-{n + 1}.dcm", data)
            if study_uid is not None and arrival.study_uid != study_uid:
                failed.append(_sop_item(arrival.reference, MISMATCH))
                reasons.add("study_uid_mismatch")
                continue
            study = pending.setdefault(arrival.study_uid, intake.PendingStudy(
                arrival.study_uid, "stow", None, arrival.identifiers))
            intake.check_room(study)
            intake.admit(study, arrival)
            referenced.append(_sop_item(arrival.reference))
        except UploadError as exc:
            failed.append(_sop_item(_uids_of(data),
                                    intake.STATUS_BY_CODE.get(exc.code, intake.INPUT_ERROR)))
            reasons.add(exc.code)
    stored = [intake.store(study, current_user.id) for study in pending.values() if study.images]
    for study in stored:
        audit.record("study_uploaded", study_id=study.id, images=len(study.images), via="stow")
    body: dict[str, Any] = {}
    if referenced:
        body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": referenced}
    if failed:
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    response = jsonify(body)
    response.mimetype = "application/dicom+json"
    response.status_code = 200 if not failed else 202 if referenced else 409
    for code in sorted(reasons):  # PS3.18 8.3.3: readable reasons as Warning headers
        response.headers.add("Warning", f'299 covidcxr "{code}"')
    if len(stored) == 1:
        response.headers["Location"] = url_for("api.get_study", study_id=stored[0].id)
    return response
