"""Pages: upload a study, list studies, read a study (which refreshes until done)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from sqlalchemy import func, select

from webapp.clinician.forms import UploadForm
from webapp.extensions import db
from webapp.jobs import FINISHED, StudyStatus
from webapp.models import Study
from webapp.serializers import NOTICE, study_json
from webapp.studies import get_study_or_404
from webapp.uploads import UploadError, create_study

bp = Blueprint("clinician", __name__)
PER_PAGE = 25


@bp.get("/")
def index() -> Any:
    """The studies list is home."""
    return redirect(url_for("clinician.studies"))


@bp.get("/studies")
def studies() -> Any:
    """Studies, newest first, with status; ?q= filters by patient reference or accession."""
    page = request.args.get("page", "1")
    page = int(page) if page.isdigit() and int(page) > 0 else 1
    query = select(Study)
    q = (request.args.get("q") or "").strip()
    if q:
        query = query.where((Study.patient_ref == q) | (Study.accession == q))
    total = db.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.session.scalars(
        query.order_by(Study.created_at.desc()).limit(PER_PAGE).offset((page - 1) * PER_PAGE)
    ).all()
    return render_template(
        "clinician/list.html",
        studies=rows,
        page=page,
        has_next=page * PER_PAGE < total,
        total=total,
        q=q,
    )


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
            )
        except UploadError as exc:
            flash(exc.message, "error")
            return render_template("clinician/new.html", form=form), exc.status
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
    return render_template(
        "clinician/study.html",
        study=found,
        data=study_json(found),
        pending=StudyStatus(found.status) not in FINISHED,
        notice=NOTICE,
    )
