"""The DICOM storage listener in this process (real sockets, pynetdicom's SCU), on a real database."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from sqlalchemy import select

from tests.accounts import make_user
from tests.conftest import real_xray_paths
from tests.dicom_objects import (
    BASIC_TEXT_SR,
    DX_FOR_PRESENTATION,
    cxr_dataset,
    new_study,
    report_dataset,
    truncated_dataset,
)
from webapp.pacs.transport import store

OWNER = "pacs-owner@example.org"
VERIFICATION = "1.2.840.10008.1.1"
SCU_AE = "TESTSCU"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listener(app) -> Iterator[dict]:
    """The listener serving the test app's database, settling after 0.3 s."""
    from webapp.pacs.listener import serve

    make_user(app, OWNER)
    port = _free_port()
    app.config.update(DICOM_PORT=port, DICOM_ALLOWED_CALLING_AETS=[SCU_AE],
                      DICOM_OWNER_EMAIL=OWNER, DICOM_SETTLE_S=0.3)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(app, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield {"port": port, "stop": stop}
    stop.set()
    thread.join(timeout=20)
    assert not thread.is_alive()


def _associate(port: int, calling: str = SCU_AE):
    ae = AE(ae_title=calling)
    for sop_class in (DX_FOR_PRESENTATION, BASIC_TEXT_SR, VERIFICATION):
        ae.add_requested_context(sop_class)
    return ae.associate("127.0.0.1", port, ae_title="COVIDCXR")


def _studies(app, n: int, timeout: float = 10.0) -> list:
    from webapp.extensions import db
    from webapp.models import Study
    from webapp.pacs.models import DicomOrigin

    deadline = time.monotonic() + timeout
    while True:
        with app.app_context():
            rows = db.session.execute(
                select(Study, DicomOrigin).join(DicomOrigin, DicomOrigin.study_id == Study.id)
                .order_by(Study.created_at)).all()
            found = [({"status": study.status, "owner": study.owner.email,
                       "patient_ref": study.patient_ref, "accession": study.accession,
                       "attributes": [i.attributes for i in study.images]},
                      origin, [bytes(i.data) for i in study.images]) for study, origin in rows]
            db.session.remove()
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_objects_are_refused_and_the_association_carries_on(app, listener):
    png = real_xray_paths(1)[0]
    study = new_study()
    assoc = _associate(listener["port"])
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    statuses = []
    for ds in (cxr_dataset(png, study), cxr_dataset(png, study, frames=2), report_dataset(study),
               truncated_dataset(png, study), cxr_dataset(png, study)):
        reply = store(assoc, ds)
        statuses.append((int(reply.Status), str(reply.get("ErrorComment", "")).split(":")[0]))
    assoc.release()
    assert statuses == [(0x0000, ""), (0xC003, "multi_frame"), (0xC004, "dicom_no_pixel_data"),
                        (0xC002, "corrupt_image"), (0x0000, "")]

    [(stored, origin, images)] = _studies(app, 1)
    assert stored["status"] == "queued" and len(images) == 2 and stored["owner"] == OWNER
    assert stored["patient_ref"] is None and stored["accession"] is None
    assert all(b"Quixote" not in data and b"MRN-0042" not in data for data in images)
    assert all(a["PatientIdentityRemoved"] == "YES" for a in stored["attributes"])
    # What the results need to file with the patient, kept outside the stored images.
    assert origin.via == "dimse" and origin.calling_ae == SCU_AE
    kept = origin.identifiers["study"]
    assert kept["00100020"]["Value"] == ["MRN-0042"]
    assert kept["0020000D"]["Value"] == [study["StudyInstanceUID"]]
    assert [r["series_instance_uid"] for r in origin.identifiers["images"]] == \
        [study["SeriesInstanceUID"]] * 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_objects_become_one_study_per_study_uid_and_a_full_study_refuses_more(app, listener):
    app.config["MAX_FILES_PER_STUDY"] = 2
    png = real_xray_paths(1)[0]
    first, second = new_study(), new_study()
    assoc = _associate(listener["port"])
    codes = [int(store(assoc, cxr_dataset(png, s)).Status)
             for s in (first, second, first, second, first)]
    assoc.release()
    assert codes == [0, 0, 0, 0, 0xA701]
    found = _studies(app, 2)
    assert sorted(len(images) for _, _, images in found) == [2, 2]
    uids = {origin.identifiers["study"]["0020000D"]["Value"][0] for _, origin, _ in found}
    assert uids == {first["StudyInstanceUID"], second["StudyInstanceUID"]}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_unknown_calling_ae_titles_are_rejected(app, listener):
    assoc = _associate(listener["port"], calling="STRANGER")
    assert assoc.is_rejected
    assert _studies(app, 1, timeout=0.5) == []
