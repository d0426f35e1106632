"""Admin pages: results on their way back to the PACS (every send, its status, attempts and last error)."""

from __future__ import annotations

from typing import Any

from flask import abort, current_app, flash, jsonify, redirect, render_template, request, url_for

from webapp import audit
from webapp.admin.blueprint import bp
from webapp.admin.forms import PacsRetryForm
from webapp.extensions import db
from webapp.models import as_utc
from webapp.pacs import sends
from webapp.pacs.models import PacsSend
from webapp.security import admin_required


def _status_filter() -> str | None:
    status = request.args.get("status") or None
    if status is not None and status not in {s.value for s in sends.SendStatus}:
        abort(400, description=f"status must be one of {', '.join(s.value for s in sends.SendStatus)}")
    return status


def _time(value: Any) -> str | None:
    value = as_utc(value)
    return value.isoformat() if value else None


def send_json(send: PacsSend) -> dict[str, Any]:
    """One send as the admin JSON shows it (ids and codes, no patient data)."""
    return {
        "id": send.id, "study_id": send.study_id, "destination": send.destination,
        "status": send.status, "attempts": send.attempts, "objects": send.objects,
        "last_error": send.last_error, "created_at": _time(send.created_at),
        "last_attempt_at": _time(send.last_attempt_at),
        "next_attempt_at": _time(send.next_attempt_at) if send.status == "pending" else None,
        "sent_at": _time(send.sent_at),
    }


@bp.get("/pacs")
@admin_required
def pacs_sends() -> Any:
    """Sends to the PACS, newest first, with counts by status and a retry for failed ones."""
    status = _status_filter()
    return render_template(
        "admin/pacs.html", sends=sends.recent(db.session, status), status=status,
        counts=sends.status_counts(db.session), statuses=[s.value for s in sends.SendStatus],
        destination=(current_app.config["PACS_DESTINATION"] or {}).get("label"),
        ae_title=current_app.config["DICOM_AE_TITLE"], port=current_app.config["DICOM_PORT"],
        form=PacsRetryForm(), as_utc=as_utc,
    )


@bp.get("/pacs.json")
@admin_required
def pacs_sends_json() -> Any:
    """The same as JSON."""
    status = _status_filter()
    return jsonify({"counts": sends.status_counts(db.session),
                    "sends": [send_json(s) for s in sends.recent(db.session, status)]})


@bp.post("/pacs/<int:send_id>/retry")
@admin_required
def retry_pacs_send(send_id: int) -> Any:
    """Try a failed send again, with a fresh count of attempts."""
    if not PacsRetryForm().validate_on_submit():
        abort(400, description="the form has expired; reload the page")
    send = db.session.get(PacsSend, send_id) or abort(404)
    study_id = send.study_id
    if sends.retry(db.session, send_id):
        sends.enqueue_send(send_id)
        audit.record("pacs_send_retried", study_id=study_id, send=send_id)
        flash("The send will be tried again.", "info")
    else:
        flash("Only a failed send can be retried.", "error")
    return redirect(url_for("admin.pacs_sends"))
