"""The clinician's workflow: the study page, the RT-PCR outcome, read-first, list search and export."""

from __future__ import annotations

import csv
import io

import pytest

from tests.accounts import form_token, session_client
from tests.conftest import CLINICIAN
from tests.webapp.rows import add_study
from webapp.extensions import db
from webapp.models import Study


@pytest.fixture
def browser(app, clinician_id):
    return session_client(app, CLINICIAN)


def test_study_page_shows_result_threshold_model_and_notice(app, browser, clinician_id):
    with app.app_context():
        study_id = add_study(clinician_id, predictions=[(0.8123, "covid"), (0.2, "non-covid")],
                             model_version="resnet50-v7")
    page = browser.get(f"/studies/{study_id}").data.decode()
    assert "Research use only. Not for diagnosis." in page
    assert "0.812" in page and "threshold 0.500" in page and "resnet50-v7" in page
    assert page.count('class="heatmap"') == 2 and "<details" in page  # the heatmap toggle
    assert "poll.js" not in page  # finished: no polling
    with app.app_context():
        pending = add_study(clinician_id, status="running")
    assert b"poll.js" in browser.get(f"/studies/{pending}").data


def test_outcome_recorded_in_the_page_and_the_api_and_audited(app, browser, client, clinician_id):
    with app.app_context():
        study_id = add_study(clinician_id)
    token = form_token(browser, f"/studies/{study_id}")
    response = browser.post(f"/studies/{study_id}/outcome", data={"csrf_token": token, "pcr_result": "positive"})
    assert response.status_code == 302
    assert b'id="pcr-result">positive' in browser.get(f"/studies/{study_id}").data
    bad = browser.post(f"/studies/{study_id}/outcome", data={"csrf_token": token, "pcr_result": "maybe"})
    assert bad.status_code == 302  # back to the page with a message; nothing changed
    corrected = client.put(f"/api/v1/studies/{study_id}/outcome", json={"pcr_result": "negative"})
    assert corrected.status_code == 200 and corrected.get_json()["pcr_result"] == "negative"
    invalid = client.put(f"/api/v1/studies/{study_id}/outcome", json={"pcr_result": "maybe"})
    assert invalid.status_code == 422 and invalid.get_json()["error"]["code"] == "invalid_outcome"
    with app.app_context():
        study = db.session.get(Study, study_id)
        assert study.pcr_result == "negative" and study.pcr_recorded_by == clinician_id
        from webapp.models import AuditEvent

        changes = [(e.detail["old"], e.detail["new"]) for e in db.session.query(AuditEvent)
                   .filter_by(action="outcome_recorded").order_by(AuditEvent.id)]
    assert changes == [(None, "positive"), ("positive", "negative")]


def test_read_first_hides_the_result_until_the_reading_is_recorded(app, browser, clinician_id):
    with app.app_context():
        study_id = add_study(clinician_id, predictions=[(0.9731, "covid")])
    assert b"0.973" in browser.get(f"/studies/{study_id}").data
    browser.post("/account/read-first", data={"csrf_token": form_token(browser, "/account")})
    hidden = browser.get(f"/studies/{study_id}").data
    assert b"0.973" not in hidden and b'class="heatmap"' not in hidden and b"Record my reading" in hidden
    polled = browser.get(f"/api/v1/studies/{study_id}").get_json()  # what the page's script fetches
    assert polled["result_withheld"] == "read_first" and polled["images"][0]["result"] is None
    token = form_token(browser, f"/studies/{study_id}")
    browser.post(f"/studies/{study_id}/impression", data={"csrf_token": token, "impression": "non-covid"})
    shown = browser.get(f"/studies/{study_id}").data
    assert b"0.973" in shown and b'id="reader-impression">non-covid' in shown
    assert browser.get(f"/api/v1/studies/{study_id}").get_json()["images"][0]["result"] is not None
    # The reading cannot be changed after the result was seen.
    again = browser.post(f"/studies/{study_id}/impression", data={"csrf_token": token, "impression": "covid"})
    assert again.status_code == 302
    with app.app_context():
        assert db.session.get(Study, study_id).reader_impression == "non-covid"


def test_list_search_status_filter_pagination_and_export(app, browser, clinician_id):
    with app.app_context():
        ids = [add_study(clinician_id, patient_ref=f"P-{i}", accession=f"A-{i}") for i in range(27)]
        failed = add_study(clinician_id, status="failed", error_code="corrupt_image", patient_ref="P-F")
    first = browser.get("/studies").data
    assert b"Page 1 \xc2\xb7 28 studies" in first and b"Older" in first
    second = browser.get("/studies?page=2").data
    assert second.count(b'<td><a href="/studies/') == 3
    assert b"P-7" in browser.get("/studies?q=P-7").data
    assert ids[7][:8].encode() in browser.get("/studies?q=A-7").data
    only_failed = browser.get("/studies?status=failed").data
    assert failed[:8].encode() in only_failed and b"1 studies" in only_failed
    assert browser.get("/studies?status=bogus").status_code == 400
    rows = list(csv.DictReader(io.StringIO(browser.get("/studies/export.csv?status=succeeded").data.decode())))
    assert len(rows) == 27 and {r["study_id"] for r in rows} == set(ids)
    assert rows[0]["max_probability_covid"] == "0.800000" and rows[0]["flagged_covid"] == "true"
