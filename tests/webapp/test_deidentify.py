"""DICOM uploads are de-identified before they are stored (PS3.15 Basic Profile), unless configured not to."""

from __future__ import annotations

import io
import logging
import re

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from ml.imaging import decode_image
from tests.accounts import form_token, session_client
from tests.conftest import CLINICIAN
from webapp.config import Settings
from webapp.extensions import db
from webapp.models import AuditEvent, Image, Study

IDENTIFYING = {
    "PatientName": "Quixote^Dulcinea",
    "PatientID": "MRN-774411",
    "PatientBirthDate": "19570412",
    "PatientAddress": "17 Rue Fictive Lyon",
    "InstitutionName": "Hopital Imaginaire",
    "InstitutionAddress": "99 Avenue Inventee",
    "ReferringPhysicianName": "Rieux^Bernard",
    "PerformingPhysicianName": "Castel^Paul",
    "OperatorsName": "Tarrou^Jean",
    "AccessionNumber": "ACC-5550123",
    "StudyID": "STUDY-8866",
    "StationName": "XR-ROOM-7",
    "StudyDate": "20240229",
    "StudyDescription": "CHEST PA Quixote",
    "PatientComments": "allergic to iodine, lives with Rambert",
    "DeviceSerialNumber": "SN-0042-XYZ",
}
PRIVATE_CREATOR = "ACME RESEARCH 1.0"
PRIVATE_VALUE = "Grand Note Dulcinea"
SOURCE_AE = "HOPIMAG_AE"
PREAMBLE = b"DUAL PERSONALITY Quixote".ljust(128, b"\0")
# Every string above, split where a PN or free text would be, so a partial leak shows too.
SECRETS = [
    *{part for value in IDENTIFYING.values() for part in re.split(r"[\^ ,]+", value) if len(part) > 4},
    PRIVATE_CREATOR, PRIVATE_VALUE, SOURCE_AE,
]
PIXELS = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # 12-bit ramp


def identified_dicom(study_uid: str, series_uid: str, frame_uid: str) -> bytes:
    """A DX image full of patient, staff and site identifiers, with private tags."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = SOURCE_AE
    ds.preamble = PREAMBLE
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.Modality, ds.ViewPosition, ds.Manufacturer = "DX", "PA", "ACME"
    for keyword, value in IDENTIFYING.items():
        setattr(ds, keyword, value)
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    referenced.ReferencedSOPInstanceUID = study_uid
    ds.ReferencedStudySequence = [referenced]
    ds.private_block(0x0009, PRIVATE_CREATOR, create=True).add_new(0x01, "LO", PRIVATE_VALUE)
    ds.private_block(0x0029, PRIVATE_CREATOR, create=True).add_new(0x10, "OB", b"Dulcinea")
    ds.Rows, ds.Columns = PIXELS.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = PIXELS.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def one_study(n: int) -> tuple[list[bytes], dict[str, str]]:
    """n files of one study and series, as a modality sends them."""
    uids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
            "FrameOfReferenceUID": generate_uid()}
    files = [identified_dicom(uids["StudyInstanceUID"], uids["SeriesInstanceUID"],
                              uids["FrameOfReferenceUID"]) for _ in range(n)]
    return files, uids


def png() -> bytes:
    buf = io.BytesIO()
    PILImage.new("L", (64, 64), 128).save(buf, format="PNG")
    return buf.getvalue()


def post_files(client, files: list[tuple[str, bytes]], **form):
    data = {"files": [(io.BytesIO(content), name) for name, content in files], **form}
    return client.post("/api/v1/studies", data=data, content_type="multipart/form-data")


def download_originals(client, study_id: str) -> list[bytes]:
    body = client.get(f"/api/v1/studies/{study_id}").get_json()
    out = []
    for image in body["images"]:
        response = client.get(f"/studies/{study_id}/images/{image['id']}/original")
        assert response.status_code == 200
        out.append(response.data)
    return out


def leaked(data: bytes | str) -> list[str]:
    text = data if isinstance(data, str) else data.decode("latin-1")
    return [s for s in SECRETS if s.lower() in text.lower()]


def audit_text(app) -> str:
    with app.app_context():
        rows = db.session.scalars(select(AuditEvent)).all()
        columns = AuditEvent.__table__.columns
        return "\n".join(str({c.name: getattr(row, c.name) for c in columns}) for row in rows)


def test_dicom_is_deidentified_before_it_is_stored(app, client, caplog):
    caplog.set_level(logging.DEBUG)
    files, uids = one_study(2)
    response = post_files(client, [("a.dcm", files[0]), ("b.dcm", files[1])], patient_ref="W7-12")
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["patient_ref"] == "W7-12"  # what the clinician typed stays
    for image in body["images"]:
        assert image["attributes"]["PatientIdentityRemoved"] == "YES"
        assert image["attributes"]["ViewPosition"] == "PA"  # acquisition details survive
    stored = download_originals(client, body["id"])

    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in stored]
    for data, ds, original in zip(stored, datasets, files, strict=True):
        assert leaked(data) == []
        assert data[:128] == b"\0" * 128
        assert not any(element.tag.is_private for element in ds.iterall())
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        # The pixel data element is byte-identical, and so is what the worker decodes.
        assert ds.PixelData == PIXELS.tobytes() and data.endswith(PIXELS.tobytes())
        np.testing.assert_array_equal(decode_image(data).pixels, decode_image(original).pixels)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for uid in (*uids.values(), pydicom.dcmread(io.BytesIO(original)).SOPInstanceUID):
            assert uid.encode() not in data
    # One mapping for the whole upload: shared UIDs stay shared, distinct ones distinct.
    for keyword in uids:
        assert datasets[0][keyword].value == datasets[1][keyword].value != uids[keyword]
    assert datasets[0].SOPInstanceUID != datasets[1].SOPInstanceUID
    assert datasets[0].ReferencedStudySequence[0].ReferencedSOPInstanceUID in ("", datasets[0].StudyInstanceUID)

    assert leaked(caplog.text) == []
    assert leaked(audit_text(app)) == []
    assert "image_downloaded" in audit_text(app)


def test_each_upload_gets_its_own_uid_mapping(client):
    files, uids = one_study(1)
    studies = []
    for _ in range(2):
        response = post_files(client, [("a.dcm", files[0])])
        assert response.status_code == 202
        studies.append(pydicom.dcmread(io.BytesIO(download_originals(client, response.get_json()["id"])[0])))
    assert studies[0].StudyInstanceUID != studies[1].StudyInstanceUID


def test_the_upload_form_stores_a_deidentified_file(app, clinician_id):
    browser = session_client(app, CLINICIAN)
    files, _ = one_study(1)
    response = browser.post(
        "/studies/new",
        data={"csrf_token": form_token(browser, "/studies/new"), "patient_ref": "ward7-12",
              "files": [(io.BytesIO(files[0]), "scan.dcm")]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 302
    study_id = response.headers["Location"].rsplit("/", 1)[1]
    with app.app_context():
        image_id = db.session.scalar(select(Image.id).where(Image.study_id == study_id))
    data = browser.get(f"/studies/{study_id}/images/{image_id}/original").data
    assert data.startswith(b"\0" * 128 + b"DICM")
    assert leaked(data) == [] and data.endswith(PIXELS.tobytes())


def test_store_dicom_identifiers_keeps_the_file_as_sent(app, client, caplog):
    caplog.set_level(logging.DEBUG)
    app.config["STORE_DICOM_IDENTIFIERS"] = True
    files, _ = one_study(1)
    response = post_files(client, [("a.dcm", files[0])], patient_ref="W7-12")
    assert response.status_code == 202, response.get_json()
    assert "PatientIdentityRemoved" not in response.get_json()["images"][0]["attributes"]
    assert download_originals(client, response.get_json()["id"]) == [files[0]]
    # Kept in the image, still never copied into logs or the audit log.
    assert leaked(caplog.text) == []
    assert leaked(audit_text(app)) == []


def test_setting_is_off_unless_asked_for():
    assert Settings.from_env({"SECRET_KEY": "k"}).to_flask()["STORE_DICOM_IDENTIFIERS"] is False
    settings = Settings.from_env({"SECRET_KEY": "k", "STORE_DICOM_IDENTIFIERS": "1"})
    assert settings.to_flask()["STORE_DICOM_IDENTIFIERS"] is True


def undeidentifiable_dicom() -> bytes:
    """Readable pixels, but a damaged element (unknown VR) inside a sequence the profile must clean."""
    data = one_study(1)[0][0]
    at = data.index(b"\x08\x00\x55\x11UI")  # Referenced SOP Instance UID in Referenced Study Sequence
    return data[:at + 4] + b"ZZ" + data[at + 6:]


def test_a_file_that_cannot_be_deidentified_is_refused_and_nothing_is_stored(app, client, caplog):
    caplog.set_level(logging.DEBUG)
    bad = undeidentifiable_dicom()
    decode_image(bad)  # the pixels are fine: only de-identification fails
    response = post_files(client, [("ok.png", png()), ("bad.dcm", bad)])
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "deidentification_failed" and "bad.dcm" in error["message"]
    assert leaked(response.data) == [] and leaked(caplog.text) == []
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Study)) == 0
        assert db.session.scalar(select(func.count()).select_from(Image)) == 0


@pytest.mark.parametrize("keep", [False, True])
def test_png_is_stored_as_sent_either_way(app, client, keep):
    app.config["STORE_DICOM_IDENTIFIERS"] = keep
    response = post_files(client, [("a.png", png())])
    assert response.status_code == 202
    assert download_originals(client, response.get_json()["id"]) == [png()]
