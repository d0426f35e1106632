"""JSON API v1: create, read and list your studies; record a study's RT-PCR outcome."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, request, url_for
from flask_login import current_user
from sqlalchemy import func, select

from webapp import audit
from webapp.errors import api_error
from webapp.extensions import csrf, db
from webapp.jobs import StudyStatus
from webapp.models import Study
from webapp.outcomes import OutcomeError, record_outcome, shows_result
from webapp.serializers import study_json, study_summary
from webapp.studies import get_study_or_404, visible_studies
from webapp.uploads import UploadError, create_study

bp = Blueprint("api", __name__, url_prefix="/api/v1")
# Token clients need no CSRF token; cookie-session writes are checked in webapp/security.py.
csrf.exempt(bp)
# Repeated reads of one study by one user within this many seconds are logged once.
VIEW_DEDUPE_S = 300

MAX_PER_PAGE = 100


@bp.post("/studies")
def create() -> Any:
    """Accept a study (multipart field 'files', optional patient_ref/accession): 202 + Location."""
    try:
        study = create_study(
            request.files.getlist("files"),
            patient_ref=request.form.get("patient_ref"),
            accession=request.form.get("accession"),
            owner_id=current_user.id,
        )
    except UploadError as exc:
        return api_error(exc.status, exc.code, exc.message)
    # The state as accepted; the audit commit below would reload it (a fast worker may have it already).
    response = jsonify(study_json(study))
    audit.record("study_uploaded", study_id=study.id, images=len(study.images), via="api")
    response.status_code = 202
    response.headers["Location"] = url_for("api.get_study", study_id=study.id)
    return response


@bp.get("/studies/<study_id>")
def get_study(study_id: str) -> Any:
    """One study: status, timestamps, per-image results or the error."""
    study = get_study_or_404(study_id)
    if g.get("auth_method") == "token":
        # The study page's own polling is not logged again; a token's read is.
        audit.record("study_viewed", study_id=study.id, via="api", dedupe_s=VIEW_DEDUPE_S)
    body = study_json(study)
    if g.get("auth_method") == "session" and not shows_result(study, current_user):
        # Read-first in the browser: the page's JSON must not carry what the page hides.
        for image in body["images"]:
            image["result"] = None
        body["result_withheld"] = "read_first"
    return jsonify(body)


@bp.put("/studies/<study_id>/outcome")
def put_outcome(study_id: str) -> Any:
    """Record the RT-PCR outcome: JSON {"pcr_result": "positive" | "negative" | "unknown"}."""
    study = get_study_or_404(study_id)
    body = request.get_json(silent=True) or {}
    try:
        record_outcome(study, str(body.get("pcr_result", "")), current_user)
    except OutcomeError as exc:
        return api_error(422, "invalid_outcome", str(exc))
    return jsonify(study_json(study))


def _positive_int(name: str, default: int) -> int:
    raw = request.args.get(name, str(default))
    if not raw.isdigit() or int(raw) < 1:
        raise UploadError(400, "invalid_query", f"{name} must be a positive integer")
    return int(raw)


@bp.get("/studies")
def list_studies() -> Any:
    """Newest first, paginated with ?page=&per_page=, filtered by ?status= and ?patient_ref=."""
    try:
        page = _positive_int("page", 1)
        per_page = min(_positive_int("per_page", 20), MAX_PER_PAGE)
    except UploadError as exc:
        return api_error(exc.status, exc.code, exc.message)
    query = visible_studies()
    status = request.args.get("status")
    if status:
        if status not in {s.value for s in StudyStatus}:
            allowed = ", ".join(s.value for s in StudyStatus)
            return api_error(400, "invalid_query", f"status must be one of: {allowed}")
        query = query.where(Study.status == status)
    if request.args.get("patient_ref"):
        query = query.where(Study.patient_ref == request.args["patient_ref"])
    total = db.session.scalar(select(func.count()).select_from(query.subquery()))
    rows = db.session.scalars(
        query.order_by(Study.created_at.desc(), Study.id)
        .limit(per_page)
        .offset((page - 1) * per_page)
    ).all()
    more = page * per_page < total
    args = {k: v for k, v in request.args.items() if k not in ("page", "per_page")}
    return jsonify(
        {
            "items": [study_summary(s) for s in rows],
            "page": page,
            "per_page": per_page,
            "total": total,
            "next": url_for("api.list_studies", page=page + 1, per_page=per_page, **args)
            if more
            else None,
        }
    )
