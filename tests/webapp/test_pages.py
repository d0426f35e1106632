"""The browser pages, signed in through the login form: CSRF-protected upload form, study page, list."""

from __future__ import annotations

import io
import re

import pytest

from tests.accounts import session_client
from tests.conftest import CLINICIAN, png_bytes, real_xray_paths


@pytest.fixture
def client(app, clinician_id):
    """A browser-like client: signed in with a session cookie, no API token."""
    return session_client(app, CLINICIAN)


def csrf_token(client) -> str:
    page = client.get("/studies/new")
    assert page.status_code == 200
    match = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', page.data)
    assert match, "upload form has no CSRF token"
    return match.group(1).decode()


def test_upload_through_the_form_then_read_the_study(client):
    token = csrf_token(client)
    path = real_xray_paths(1)[0]
    response = client.post(
        "/studies/new",
        data={"csrf_token": token, "patient_ref": "ward7-12",
              "files": [(io.BytesIO(path.read_bytes()), path.name)]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 302
    study_url = response.headers["Location"]
    page = client.get(study_url)
    assert page.status_code == 200
    assert b"Research use only. Not for diagnosis." in page.data
    assert b"queued" in page.data
    assert b"poll.js" in page.data  # pending pages refresh themselves
    listing = client.get("/studies")
    assert study_url.rsplit("/", 1)[1][:8].encode() in listing.data
    assert b"ward7-12" in client.get("/studies?q=ward7-12").data
    assert b"ward7-12" not in client.get("/studies?q=someone-else").data


def test_form_without_csrf_token_is_refused(client):
    response = client.post(
        "/studies/new",
        data={"files": [(io.BytesIO(png_bytes()), "a.png")]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 400
    assert b"form expired" in response.data
    assert client.get("/api/v1/studies").get_json()["total"] == 0


def test_form_with_a_bad_file_shows_the_reason(client):
    response = client.post(
        "/studies/new",
        data={"csrf_token": csrf_token(client), "files": [(io.BytesIO(b"%PDF-1.4 nope"), "scan.pdf")]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 415
    assert b"scan.pdf" in response.data and b"flash-error" in response.data


def test_form_without_files_asks_for_one(client):
    response = client.post("/studies/new", data={"csrf_token": csrf_token(client)},
                           content_type="multipart/form-data")
    assert response.status_code == 400
    assert b"attach at least one image" in response.data


def test_unknown_study_page_is_404_html(client):
    response = client.get("/studies/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 404
    assert b"<h1>Error 404</h1>" in response.data


def test_home_redirects_to_studies(client):
    assert client.get("/").headers["Location"].endswith("/studies")
