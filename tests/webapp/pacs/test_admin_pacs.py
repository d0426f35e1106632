"""Admins see every send to the PACS (status, attempts, last error) and can retry a failed one."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.accounts import form_token, make_user, session_client
from tests.conftest import ADMIN
from tests.webapp.rows import add_study
from webapp.extensions import db
from webapp.pacs import sends
from webapp.pacs.models import PacsSend


def _send(app, status: str, error: str | None = None) -> tuple[int, str]:
    with app.app_context():
        study_id = add_study(None)
        send = PacsSend(study_id=study_id, destination="dicom://PACS@pacs:104", status=status,
                        attempts=12 if status == "failed" else 1, objects=0, last_error=error)
        db.session.add(send)
        db.session.commit()
        send_id = send.id
        db.session.remove()
    return send_id, study_id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_admins_see_sends_and_clinicians_do_not(app, client, admin_client):
    _send(app, "sent")
    failed_id, failed_study = _send(app, "failed", "unreachable: no association with dicom://PACS@pacs:104")
    body = admin_client.get("/admin/pacs.json").get_json()
    assert body["counts"] == {"pending": 0, "sending": 0, "sent": 1, "failed": 1}
    [failed] = admin_client.get("/admin/pacs.json?status=failed").get_json()["sends"]
    assert (failed["id"], failed["study_id"], failed["attempts"]) == (failed_id, failed_study, 12)
    assert failed["last_error"].startswith("unreachable")
    page = admin_client.get("/admin/pacs")
    assert page.status_code == 200 and failed_study.encode() in page.data and b"Retry" in page.data
    assert admin_client.get("/admin/pacs.json?status=lost").status_code == 400
    assert client.get("/admin/pacs").status_code == 403
    assert client.get("/admin/pacs.json").status_code == 403


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_failed_send_can_be_retried_by_an_admin(app, monkeypatch):
    hinted: list = []
    monkeypatch.setattr(sends, "enqueue_send", lambda send_id, countdown=None: hinted.append(send_id))
    make_user(app, ADMIN, role="admin")
    browser = session_client(app, ADMIN)
    failed_id, _ = _send(app, "failed", "store_refused: status 0xA700")
    sent_id, _ = _send(app, "sent")
    for send_id in (failed_id, sent_id):
        response = browser.post(f"/admin/pacs/{send_id}/retry",
                                data={"csrf_token": form_token(browser, "/admin/pacs")})
        assert response.status_code == 302
    assert browser.post(f"/admin/pacs/{failed_id}/retry").status_code == 400  # no CSRF token
    assert hinted == [failed_id]
    with app.app_context():
        statuses = dict(db.session.execute(select(PacsSend.id, PacsSend.status)).all())
        attempts = db.session.get(PacsSend, failed_id).attempts
    assert statuses == {failed_id: "pending", sent_id: "sent"} and attempts == 0
