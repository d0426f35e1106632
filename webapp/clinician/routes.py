"""Pages: upload a study, list and export studies, read a study, record its outcome."""

from __future__ import annotations

import csv
import io
from typing import Any

from flask import Blueprint, Response, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from webapp import audit
from webapp.clinician.forms import ImpressionForm, OutcomeForm, UploadForm
from webapp.extensions import db
from webapp.jobs import FINISHED, StudyStatus
from webapp.models import Image, Study, as_utc
from webapp.outcomes import OutcomeError, record_impression, record_outcome, shows_result
from webapp.serializers import NOTICE, study_json
from webapp.studies import get_study_or_404, visible_studies
from webapp.uploads import UploadError, create_study

bp = Blueprint("clinician", __name__)
PER_PAGE = 25
EXPORT_LIMIT = 10_000
# Views of one study by one user within this many seconds are logged once.
VIEW_DEDUPE_S = 300


@bp.get("/")
def index() -> Any:
    """The studies list is home."""
    return redirect(url_for("clinician.studies"))


def _filtered() -> tuple[Any, str, str]:
    """The user's visible studies, filtered by ?q= (patient ref or accession) and ?status=."""
    query = visible_studies()
    q = (request.args.get("q") or "").strip()
    if q:
        query = query.where((Study.patient_ref == q) | (Study.accession == q))
    status = (request.args.get("status") or "").strip()
    if status:
        if status not in {s.value for s in StudyStatus}:
            abort(400, description="unknown status")
        query = query.where(Study.status == status)
    return query, q, status


@bp.get("/studies")
def studies() -> Any:
    """Studies, newest first, with status; search by patient reference or accession."""
    page = request.args.get("page", "1")
    page = int(page) if page.isdigit() and int(page) > 0 else 1
    query, q, status = _filtered()
    total = db.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.session.scalars(
        query.order_by(Study.created_at.desc(), Study.id).limit(PER_PAGE).offset((page - 1) * PER_PAGE)
    ).all()
    return render_template(
        "clinician/list.html", studies=rows, page=page, has_next=page * PER_PAGE < total,
        total=total, q=q, status=status, statuses=[s.value for s in StudyStatus],
    )


@bp.get("/studies/export.csv")
def export() -> Response:
    """The filtered list as CSV (your studies; admins: all). Results, no image bytes."""
    query, _, _ = _filtered()
    rows = db.session.scalars(
        query.options(selectinload(Study.images).selectinload(Image.prediction))
        .order_by(Study.created_at.desc()).limit(EXPORT_LIMIT)
    ).all()
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["study_id", "patient_ref", "accession", "status", "created_at", "finished_at",
                     "images", "max_probability_covid", "flagged_covid", "model_version", "pcr_result"])
    for s in rows:
        # Abstained images (input gate) give no reading: their probability is never exported.
        preds = [i.prediction for i in s.images
                 if i.prediction is not None and i.prediction.abstain_reason is None]
        writer.writerow([
            s.id, s.patient_ref or "", s.accession or "", s.status,
            as_utc(s.created_at).isoformat(), as_utc(s.finished_at).isoformat() if s.finished_at else "",
            len(s.images),
            f"{max(p.probability_covid for p in preds):.6f}" if preds else "",
            str(any(p.label == "covid" for p in preds)).lower() if preds else "",
            preds[0].model_version if preds else "", s.pcr_result or "",
        ])
    audit.record("studies_exported", rows=len(rows))
    response = Response(out.getvalue(), mimetype="text/csv")
    response.headers["Content-Disposition"] = 'attachment; filename="studies.csv"'
    return response


@bp.route("/studies/new", methods=["GET", "POST"])
def new_study() -> Any:
    """Upload form; on success go to the study page, which polls for the result."""
    form = UploadForm()
    if form.validate_on_submit():
        try:
            study = create_study(
                request.files.getlist(form.files.name),
                patient_ref=form.patient_ref.data,
                accession=form.accession.data,
                owner_id=current_user.id,
            )
        except UploadError as exc:
            flash(exc.message, "error")
            return render_template("clinician/new.html", form=form), exc.status
        audit.record("study_uploaded", study_id=study.id, images=len(study.images), via="form")
        flash("Study uploaded; the result appears here when the worker is done.", "info")
        return redirect(url_for("clinician.study", study_id=study.id))
    status = 400 if form.errors else 200
    for field, errors in form.errors.items():
        for error in errors:
            flash(f"{getattr(form, field).label.text}: {error}", "error")
    return render_template("clinician/new.html", form=form), status


@bp.get("/studies/<study_id>")
def study(study_id: str) -> Any:
    """A study's images and results; refreshes itself while the study is pending."""
    found = get_study_or_404(study_id)
    audit.record("study_viewed", study_id=found.id, via="page", dedupe_s=VIEW_DEDUPE_S)
    return render_template(
        "clinician/study.html",
        study=found,
        data=study_json(found),
        pending=StudyStatus(found.status) not in FINISHED,
        show_result=shows_result(found, current_user),
        outcome_form=OutcomeForm(pcr_result=found.pcr_result),
        impression_form=ImpressionForm(),
        notice=NOTICE,
    )


@bp.post("/studies/<study_id>/outcome")
def outcome(study_id: str) -> Any:
    """Record the confirmed RT-PCR outcome."""
    found = get_study_or_404(study_id)
    form = OutcomeForm()
    if not form.validate_on_submit():
        flash("Choose positive, negative or unknown.", "error")
        return redirect(url_for("clinician.study", study_id=found.id))
    record_outcome(found, form.pcr_result.data, current_user)
    flash(f"RT-PCR outcome recorded: {form.pcr_result.data}.", "info")
    return redirect(url_for("clinician.study", study_id=found.id))


@bp.post("/studies/<study_id>/impression")
def impression(study_id: str) -> Any:
    """Read-first: record your own reading, then the AI result is shown."""
    found = get_study_or_404(study_id)
    form = ImpressionForm()
    if not form.validate_on_submit():
        flash("Choose one reading.", "error")
        return redirect(url_for("clinician.study", study_id=found.id))
    try:
        record_impression(found, form.impression.data, current_user)
    except OutcomeError as exc:
        flash(str(exc), "error")
    return redirect(url_for("clinician.study", study_id=found.id))
