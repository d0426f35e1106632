"""DICOMweb STOW-RS (POST /dicomweb/studies): the listener's intake over HTTP with an API token."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.conftest import CLINICIAN, real_xray_paths
from tests.dicom_objects import cxr_dataset, encode, new_study, report_dataset
from webapp.pacs.multipart import decode_related, encode_related


def _post(client, parts: list[bytes], path: str = "/dicomweb/studies"):
    body, content_type = encode_related(parts)
    return client.post(path, data=body, content_type=content_type,
                       headers={"Accept": "application/dicom+json"})


def _stored(app) -> list[dict]:
    from webapp.extensions import db
    from webapp.models import Study
    from webapp.pacs.models import DicomOrigin

    with app.app_context():
        rows = db.session.execute(select(Study, DicomOrigin).join(
            DicomOrigin, DicomOrigin.study_id == Study.id)).all()
        out = [{"id": s.id, "owner": s.owner.email, "images": len(s.images), "status": s.status,
                "via": o.via, "patient_id": o.identifiers["study"]["00100020"]["Value"][0]}
               for s, o in rows]
        db.session.remove()
    return out


def _reasons(body: dict) -> list[int]:
    return [item["00081197"]["Value"][0] for item in body.get("00081198", {}).get("Value", [])]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_good_parts_become_one_study_and_bad_ones_are_listed_with_a_reason(app, client):
    png = real_xray_paths(1)[0]
    study = new_study()
    good = [cxr_dataset(png, study), cxr_dataset(png, study)]
    response = _post(client, [encode(good[0]), encode(cxr_dataset(png, study, frames=3)),
                              encode(report_dataset(study)), encode(good[1])])
    assert response.status_code == 202, response.data
    assert response.mimetype == "application/dicom+json"
    body = response.get_json()
    assert [i["00081155"]["Value"][0] for i in body["00081199"]["Value"]] == \
        [str(ds.SOPInstanceUID) for ds in good]
    assert _reasons(body) == [0xC003, 0xC004]
    assert sorted(response.headers.getlist("Warning")) == [
        '299 covidcxr "dicom_no_pixel_data"', '299 covidcxr "multi_frame"']
    [stored] = _stored(app)
    assert stored == {"id": stored["id"], "owner": CLINICIAN, "images": 2, "status": "queued",
                      "via": "stow", "patient_id": "MRN-0042"}
    assert response.headers["Location"].endswith(f"/api/v1/studies/{stored['id']}")
    assert client.get(f"/api/v1/studies/{stored['id']}").status_code == 200


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_nothing_stored_is_409_and_the_url_study_must_match(app, client):
    png = real_xray_paths(1)[0]
    study, other = new_study(), new_study()
    assert _reasons(_post(client, [encode(report_dataset(study))]).get_json()) == [0xC004]
    response = _post(client, [encode(cxr_dataset(png, other))],
                     path=f"/dicomweb/studies/{study['StudyInstanceUID']}")
    assert response.status_code == 409 and _reasons(response.get_json()) == [0xA900]
    assert _stored(app) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_request_errors_use_the_api_error_shape(app, client, anon_client):
    png = real_xray_paths(1)[0]
    part = encode(cxr_dataset(png, new_study()))
    wrong = client.post("/dicomweb/studies", data=part, content_type="application/dicom")
    assert wrong.status_code == 415 and wrong.get_json()["error"]["code"] == "unsupported_media_type"
    broken = client.post("/dicomweb/studies", data=b"junk",
                         content_type='multipart/related; type="application/dicom"; boundary=x')
    assert broken.status_code == 400 and broken.get_json()["error"]["code"] == "bad_multipart"
    body, content_type = encode_related([part])
    anonymous = anon_client.post("/dicomweb/studies", data=body, content_type=content_type)
    assert anonymous.status_code == 401 and anonymous.get_json()["error"]["code"] == "unauthorized"


def test_multipart_round_trip_keeps_bytes_and_types():
    parts = [b"\r\n--not-a-boundary\r\n", bytes(range(256)) * 3, b""]
    body, content_type = encode_related(parts)
    assert [data for _, data in decode_related(b"preamble\r\n" + body, content_type)] == parts
    assert {t for t, _ in decode_related(body, content_type)} == {"application/dicom"}
