"""The audit log records who did what; admins read and filter it; it never holds patient data."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta

from sqlalchemy import select

from tests.accounts import form_token, login, session_client
from tests.conftest import CLINICIAN, real_xray_paths
from webapp.extensions import db
from webapp.models import AuditEvent, utcnow

SECRET_REF = "PATIENT-SECRET-REF"
SECRET_ACCESSION = "ACC-SECRET-99"


def _events(app) -> list[AuditEvent]:
    with app.app_context():
        events = list(db.session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
        db.session.expunge_all()
        return events


def test_a_clinicians_day_is_logged_without_patient_data(app, clinician_id, admin_client):
    login(app.test_client(), CLINICIAN, "a wrong password here")
    browser = session_client(app, CLINICIAN)
    xray = real_xray_paths(1)[0].read_bytes()
    uploaded = browser.post("/studies/new", data={
        "csrf_token": form_token(browser, "/studies/new"), "patient_ref": SECRET_REF,
        "accession": SECRET_ACCESSION, "files": [(io.BytesIO(xray), "chest.png")]},
        content_type="multipart/form-data")
    study_url = uploaded.headers["Location"]
    study_id = study_url.rsplit("/", 1)[1]
    page = browser.get(study_url).data
    browser.get(study_url)  # a reload within minutes is one view, not two
    original = re.search(rb'href="([^"]+/original)"', page).group(1).decode()
    assert browser.get(original).data == xray
    browser.get("/studies/export.csv")
    browser.post(f"/studies/{study_id}/outcome",
                 data={"csrf_token": form_token(browser, study_url), "pcr_result": "positive"})
    browser.post("/account/tokens", data={"csrf_token": form_token(browser, "/account"), "tok-name": "x", "tok-days": "5"})
    browser.post("/logout", data={"csrf_token": form_token(browser, "/studies")})

    events = _events(app)
    actions = [e.action for e in events if e.actor == CLINICIAN]
    assert actions == ["login_failed", "login", "study_uploaded", "study_viewed", "image_downloaded",
                       "studies_exported", "outcome_recorded", "token_created", "logout"]
    assert all(e.ip == "127.0.0.1" for e in events if e.actor == CLINICIAN)
    assert {e.study_id for e in events if e.action in ("study_uploaded", "study_viewed", "outcome_recorded")} == {study_id}
    failed = next(e for e in events if e.action == "login_failed")
    assert failed.user_id is None and failed.detail == {"reason": "bad_password"}
    # Nothing that identifies a patient, and no image bytes, anywhere in the log.
    dump = json.dumps([[e.actor, e.action, e.study_id, e.detail, e.ip] for e in events])
    assert SECRET_REF not in dump and SECRET_ACCESSION not in dump
    assert len(dump) < 200 * len(events)


def test_admins_filter_the_log_and_clinicians_cannot_read_it(app, clinician_id, admin_client, client):
    login(app.test_client(), "someone@example.org", "a wrong password here")
    login(app.test_client(), CLINICIAN, "a wrong password here")
    session_client(app, CLINICIAN)
    assert client.get("/admin/audit").status_code == 403
    failed = admin_client.get("/admin/audit?action=login_failed").data.decode()
    assert "2 events" in failed and "someone@example.org" in failed
    mine = admin_client.get(f"/admin/audit?actor={CLINICIAN}").data.decode()
    assert "2 events" in mine and "login_failed" in mine and "<td>login</td>" in mine
    today = utcnow().date()
    assert "3 events" in admin_client.get(f"/admin/audit?since={today}").data.decode()
    later = (today + timedelta(days=1)).isoformat()
    assert "0 events" in admin_client.get(f"/admin/audit?since={later}").data.decode()
    assert admin_client.get("/admin/audit?since=yesterday").status_code == 400
    assert admin_client.get("/admin/audit?action=bogus").status_code == 400
