"""JSON API v1: create, read and list studies."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request, url_for
from sqlalchemy import func, select

from webapp.errors import api_error
from webapp.extensions import csrf, db
from webapp.jobs import StudyStatus
from webapp.models import Study
from webapp.serializers import study_json, study_summary
from webapp.studies import get_study_or_404
from webapp.uploads import UploadError, create_study

bp = Blueprint("api", __name__, url_prefix="/api/v1")
# API clients authenticate with tokens, not cookies; CSRF protects forms only.
csrf.exempt(bp)

MAX_PER_PAGE = 100


@bp.post("/studies")
def create() -> Any:
    """Accept a study (multipart field 'files', optional patient_ref/accession): 202 + Location."""
    try:
        study = create_study(
            request.files.getlist("files"),
            patient_ref=request.form.get("patient_ref"),
            accession=request.form.get("accession"),
        )
    except UploadError as exc:
        return api_error(exc.status, exc.code, exc.message)
    response = jsonify(study_json(study))
    response.status_code = 202
    response.headers["Location"] = url_for("api.get_study", study_id=study.id)
    return response


@bp.get("/studies/<study_id>")
def get_study(study_id: str) -> Any:
    """One study: status, timestamps, per-image results or the error."""
    return jsonify(study_json(get_study_or_404(study_id)))


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
    query = select(Study)
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
