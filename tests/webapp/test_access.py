"""Who may see what: every route needs sign-in, clinicians see only their own studies, admins all."""

from __future__ import annotations

import re

import pytest

from tests.accounts import bearer_client, form_token, make_user, session_client
from tests.conftest import CLINICIAN
from tests.webapp.rows import add_study
from webapp.extensions import db
from webapp.models import Study

OTHER = "other.clinician@example.org"
# Reached without signing in; everything else must refuse.
PUBLIC = {"/login", "/healthz", "/readyz", "/metrics", "/static/<path:filename>"}


@pytest.fixture
def two_studies(app, clinician_id):
    """A study of the default clinician, and one of another clinician; ids of both."""
    other_id = make_user(app, OTHER)
    with app.app_context():
        mine = add_study(clinician_id, patient_ref="MINE-1")
        theirs = add_study(other_id, patient_ref="THEIRS-1", accession="ACC-THEIRS")
        image = db.session.get(Study, theirs).images[0].id
        my_image = db.session.get(Study, mine).images[0].id
    return {"mine": mine, "theirs": theirs, "their_image": image, "my_image": my_image}


def _concrete(rule: str, study_id: str, image_id: int) -> str:
    rule = (rule.replace("<study_id>", study_id).replace("<int:image_id>", str(image_id))
            .replace("<window>", "day"))
    # Any other id (tokens, users, PACS sends, DICOM UIDs): a value that exists or not, the
    # answer to an anonymous request must be the same 401.
    return re.sub(r"<[a-z]+:\w+>|<\w+>", "1", rule)


def test_every_route_but_the_public_ones_refuses_anonymous_requests(app, anon_client, two_studies):
    # A valid CSRF token (anyone can get one from the login page) must not be enough.
    token = form_token(anon_client, "/login")
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.rule in PUBLIC:
            continue
        url = _concrete(rule.rule, two_studies["theirs"], two_studies["their_image"])
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            data = None if method == "GET" else {"csrf_token": token, "pcr_result": "positive"}
            response = anon_client.open(url, method=method, data=data)
            assert response.status_code == 401, (method, url, response.status_code)
            assert response.get_json()["error"]["code"] == "unauthorized"
            checked += 1
    assert checked >= 25
    # A browser navigating to a page is sent to the login form, and comes back after.
    page = anon_client.get(f"/studies/{two_studies['theirs']}", headers={"Accept": "text/html"})
    assert page.status_code == 302
    assert page.headers["Location"].startswith("/login?next=/studies/")
    # The public ones answer.
    assert anon_client.get("/healthz").status_code == 200
    assert anon_client.get("/login").status_code == 200
    assert anon_client.get("/metrics").status_code == 200


def test_metrics_can_be_closed_to_all_but_admins(app, anon_client, client, admin_client):
    app.config["METRICS_PUBLIC"] = False
    assert anon_client.get("/metrics").status_code == 401
    assert client.get("/metrics").status_code == 403
    assert admin_client.get("/metrics").status_code == 200


def test_another_clinicians_study_is_not_found_anywhere(client, two_studies):
    theirs, image = two_studies["theirs"], two_studies["their_image"]
    mine, my_image = two_studies["mine"], two_studies["my_image"]
    for suffix in ("original", "preview.png", "heatmap.png"):
        # The same URLs work for the owner: the 404 below is the access rule, not a bad URL.
        assert client.get(f"/studies/{mine}/images/{my_image}/{suffix}").status_code == 200
        response = client.get(f"/studies/{theirs}/images/{image}/{suffix}")
        assert response.status_code == 404, suffix
        # An own study id with the other's image id does not leak it either.
        assert client.get(f"/studies/{mine}/images/{image}/{suffix}").status_code == 404
    assert client.get(f"/studies/{mine}").status_code == 200
    assert client.get(f"/studies/{theirs}").status_code == 404
    assert client.get(f"/api/v1/studies/{mine}").status_code == 200
    missing = client.get(f"/api/v1/studies/{theirs}")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    put = client.put(f"/api/v1/studies/{theirs}/outcome", json={"pcr_result": "positive"})
    assert put.status_code == 404


def test_another_clinicians_study_cannot_be_changed_through_the_forms(app, clinician_id, two_studies):
    browser = session_client(app, CLINICIAN)
    token = form_token(browser, f"/studies/{two_studies['mine']}")
    for form, data in (("outcome", {"pcr_result": "positive"}), ("impression", {"impression": "covid"})):
        response = browser.post(f"/studies/{two_studies['theirs']}/{form}", data={"csrf_token": token, **data})
        assert response.status_code == 404, form
    with app.app_context():
        theirs = db.session.get(Study, two_studies["theirs"])
        assert theirs.pcr_result is None and theirs.reader_impression is None


def test_lists_search_and_export_show_only_own_studies(client, two_studies):
    listed = client.get("/api/v1/studies").get_json()
    assert [s["id"] for s in listed["items"]] == [two_studies["mine"]] and listed["total"] == 1
    # Filtering for the other's reference finds nothing rather than their study.
    assert client.get("/api/v1/studies?patient_ref=THEIRS-1").get_json()["total"] == 0
    assert client.get("/api/v1/studies?status=succeeded").get_json()["total"] == 1
    page = client.get("/studies").data
    assert b"MINE-1" in page and b"THEIRS-1" not in page
    for q in ("THEIRS-1", "ACC-THEIRS"):  # the search box echoes the query; the study must not show
        found = client.get(f"/studies?q={q}").data
        assert two_studies["theirs"][:8].encode() not in found and b"No studies match" in found
    export = client.get("/studies/export.csv")
    assert export.status_code == 200 and export.mimetype == "text/csv"
    assert two_studies["mine"].encode() in export.data
    assert two_studies["theirs"].encode() not in export.data and b"THEIRS-1" not in export.data


def test_admins_see_every_study_and_clinicians_no_admin_page(app, client, admin_client, two_studies):
    with app.app_context():
        legacy = add_study(None, patient_ref="LEGACY-1")  # from before accounts existed
    listed = admin_client.get("/api/v1/studies").get_json()
    assert {s["id"] for s in listed["items"]} == {two_studies["mine"], two_studies["theirs"], legacy}
    assert admin_client.get(f"/studies/{two_studies['theirs']}").status_code == 200
    image = two_studies["their_image"]
    assert admin_client.get(f"/studies/{two_studies['theirs']}/images/{image}/heatmap.png").status_code == 200
    assert client.get(f"/api/v1/studies/{legacy}").status_code == 404  # ownerless: admins only
    for url in ("/admin/", "/admin/users", "/admin/audit", "/admin/dashboard.json",
                "/admin/charts/drift-day.svg"):
        denied = client.get(url)
        assert denied.status_code == 403, url
        assert admin_client.get(url).status_code == 200, url
    assert re.search(rb"other\.clinician@example\.org", admin_client.get("/studies").data)


def test_uploads_belong_to_the_uploader(app, client, clinician_id):
    from tests.conftest import png_bytes, post_files

    body = post_files(client, [("a.png", png_bytes())]).get_json()
    with app.app_context():
        assert db.session.get(Study, body["id"]).owner_id == clinician_id
    other = bearer_client(app, make_user(app, OTHER) and OTHER)
    assert other.get(body["url"]).status_code == 404
