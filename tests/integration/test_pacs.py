"""The PACS round trip on real processes: storescu -> the listener -> the worker -> Orthanc.

A DICOM chest X-ray goes to `python -m webapp.pacs.listener` with DCMTK's storescu, the
real worker reads it, and the structured report and the heatmap secondary capture arrive
in Orthanc (Debian's, on free ports) in the original study, queried back over its REST API.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from pynetdicom import AE

from tests.conftest import real_xray_paths
from tests.dicom_objects import (
    BASIC_TEXT_SR,
    DX_FOR_PRESENTATION,
    PATIENT,
    cxr_dataset,
    new_study,
    report_dataset,
    truncated_dataset,
)
from tests.integration.conftest import STACK_USER, _free_port
from tests.integration.pacs import (
    LISTENER_AE,
    MODALITY_AE,
    Orthanc,
    start_listener,
    storescu,
)
from webapp.pacs.transport import store

pytestmark = pytest.mark.integration
SETTLE_S = 1.0


def pacs_env(orthanc: Orthanc, **extra: str) -> dict[str, str]:
    """The settings a site sets to connect the service to its PACS."""
    return {"PACS_DESTINATION": orthanc.destination, "DICOM_PORT": str(_free_port()),
            "DICOM_ALLOWED_CALLING_AETS": MODALITY_AE, "DICOM_OWNER_EMAIL": STACK_USER,
            "DICOM_SETTLE_S": str(SETTLE_S), **extra}


def wait_ready(stack, timeout: float = 120.0) -> None:
    """Until /readyz says the database, broker, model and a worker answer."""
    deadline = time.monotonic() + timeout
    while requests.get(f"{stack.base_url}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the stack is not ready"
        time.sleep(0.2)


def write(path: Path, ds) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def rows(database_url: str, sql: str) -> list:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        found = conn.execute(sa.text(sql)).all()
    engine.dispose()
    return found


def _items(ds) -> list:
    out = []
    for item in ds.get("ContentSequence", []):
        out += [item, *_items(item)]
    return out


def _value(items: list, code: str):
    for item in items:
        if item.ConceptNameCodeSequence[0].CodeValue == code:
            if "MeasuredValueSequence" in item:
                return float(item.MeasuredValueSequence[0].NumericValue)
            if "ConceptCodeSequence" in item:
                return item.ConceptCodeSequence[0].CodeValue
            return item.TextValue
    return None


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_chest_xray_from_the_modality_comes_back_to_the_pacs_as_report_and_heatmap(
    stack_factory, database_url, tiny_model_dir, tmp_path
):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        stack = stack_factory(database_url, tiny_model_dir, extra_env=pacs_env(orthanc))
        stack.procs.append(listener := start_listener(stack.env, tmp_path))
        port = int(stack.env["DICOM_PORT"])
        wait_ready(stack)  # a warm worker: the latency printed below is the service's, not a cold start
        png = real_xray_paths(1, "covid")[0]
        study = new_study()
        frontal, lateral = cxr_dataset(png, study), cxr_dataset(png, study, view="LL")
        sent = storescu(port, write(tmp_path / "pa.dcm", frontal), write(tmp_path / "ll.dcm", lateral))
        last_received = time.monotonic()
        assert sent.returncode == 0, sent.stdout + sent.stderr

        [report, heatmap], arrived = orthanc.wait_for(study["StudyInstanceUID"], 2)
        report, heatmap = sorted((report, heatmap), key=lambda ds: ds.Modality != "SR")
        [listed] = stack.get("/api/v1/studies").json()["items"]
        body = stack.wait(listed["id"])
        read, abstained = (image["result"] for image in body["images"])
        print(f"\nlast image received -> SR in Orthanc {arrived - last_received:.2f} s "
              f"(settle {SETTLE_S:.1f} s); inference per image {read['inference_ms']:.0f} ms")

        # Filed with the right patient, in the original study, as new series and instances.
        for ds in (report, heatmap):
            assert ds.PatientID == PATIENT["PatientID"] and str(ds.PatientName) == PATIENT["PatientName"]
            assert ds.AccessionNumber == PATIENT["AccessionNumber"]
            assert ds.StudyInstanceUID == study["StudyInstanceUID"]
            assert ds.SeriesInstanceUID != study["SeriesInstanceUID"]
        assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
        items = _items(report)
        assert _value(items, "121106") == "Research use only. Not for diagnosis."
        assert _value(items, "111003") == read["model_version"]
        assert _value(items, "MODEL_SHA256") == read["model_sha256"]
        assert _value(items, "PROB_COVID19") == pytest.approx(read["probability_covid"], abs=1e-6)
        assert _value(items, "THRESHOLD") == pytest.approx(read["threshold"])
        assert _value(items, "TRIAGE_LABEL") == {"covid": "COVID19_FLAGGED",
                                                 "non-covid": "COVID19_NOT_FLAGGED"}[read["label"]]
        # The lateral view: the gate's abstention, no probability and no heatmap.
        assert abstained["label"] == "indeterminate" and abstained["abstain_reason"] == "not_frontal"
        lateral_items = report.ContentSequence[-1].ContentSequence
        assert _value(lateral_items, "TRIAGE_LABEL") == "INDETERMINATE"
        assert _value(lateral_items, "ABSTAIN_REASON").startswith("not_frontal: ")
        assert _value(lateral_items, "PROB_COVID19") is None
        assert heatmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and heatmap.SamplesPerPixel == 3
        assert heatmap.SourceImageSequence[0].ReferencedSOPInstanceUID == frontal.SOPInstanceUID

        # Stored de-identified; the mapping is gone once the results are back; the send is on record.
        stored = rows(database_url, "SELECT data FROM images")
        assert stored and all(b"Quixote" not in bytes(data) for (data,) in stored)
        assert rows(database_url, "SELECT identifiers FROM dicom_origins") == [(None,)]
        assert rows(database_url, "SELECT status, attempts, objects FROM pacs_sends") == \
            [("sent", 1, 2)]
        page = stack.get("/admin/pacs")
        assert page.status_code == 200 and listed["id"] in page.text

        # Bad objects over DICOM: a clear status each, and the listener and association carry on.
        ae = AE(ae_title=MODALITY_AE)
        for sop_class in (DX_FOR_PRESENTATION, BASIC_TEXT_SR):
            ae.add_requested_context(sop_class)
        assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
        other = new_study()
        codes = [int(store(assoc, ds).Status) for ds in (
            cxr_dataset(png, other, frames=2), report_dataset(other),
            truncated_dataset(png, other), cxr_dataset(png, other))]
        assoc.release()
        assert codes == [0xC003, 0xC004, 0xC002, 0x0000]
        assert listener.poll() is None
        orthanc.wait_for(other["StudyInstanceUID"], 2)
    finally:
        orthanc.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_results_wait_for_a_pacs_that_is_down_and_arrive_once_when_it_is_back(
    stack_factory, database_url, tiny_model_dir, tmp_path
):
    orthanc = Orthanc(tmp_path / "orthanc")  # ports chosen, not started: the PACS is down
    env = pacs_env(orthanc, PACS_RETRY_BASE_S="1", PACS_RETRY_MAX_S="2", PACS_TIMEOUT_S="5",
                   PACS_SEND_MAX_ATTEMPTS="1000", SWEEP_INTERVAL_S="1")
    stack = stack_factory(database_url, tiny_model_dir, extra_env=env, beat=True)
    stack.procs.append(start_listener(stack.env, tmp_path))
    png = real_xray_paths(1, "covid")[0]
    studies = [new_study(), new_study()]
    for n, study in enumerate(studies):
        sent = storescu(int(env["DICOM_PORT"]), write(tmp_path / f"{n}.dcm", cxr_dataset(png, study)))
        assert sent.returncode == 0, sent.stdout + sent.stderr
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            sends = rows(database_url, "SELECT status, attempts, last_error FROM pacs_sends")
            if len(sends) == 2 and all(a >= 2 for _, a, _ in sends):
                break
            time.sleep(0.2)
        # Both studies were read while their results could not go anywhere.
        assert [s["status"] for s in stack.get("/api/v1/studies").json()["items"]] == ["succeeded"] * 2
        assert all(status in ("pending", "sending") and attempts >= 2 for status, attempts, _ in sends)
        assert any((error or "").startswith("unreachable") for _, _, error in sends)
        assert rows(database_url, "SELECT COUNT(*) FROM dicom_origins WHERE identifiers IS NOT NULL") \
            == [(2,)]

        orthanc.start()
        for study in studies:
            instances, _ = orthanc.wait_for(study["StudyInstanceUID"], 2, timeout=60)
            assert sorted(ds.Modality for ds in instances) == ["OT", "SR"]
        deadline = time.monotonic() + 30
        while rows(database_url, "SELECT COUNT(*) FROM pacs_sends WHERE status = 'sent'") != [(2,)]:
            assert time.monotonic() < deadline, rows(database_url, "SELECT * FROM pacs_sends")
            time.sleep(0.2)
        time.sleep(3)  # any retry still in flight would land now
        for study in studies:
            assert len(orthanc.instances(study["StudyInstanceUID"])) == 2
        assert rows(database_url, "SELECT COUNT(*) FROM dicom_origins WHERE identifiers IS NULL") \
            == [(2,)]
    finally:
        orthanc.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_stow_rs_in_and_stow_rs_out(stack_factory, database_url, tiny_model_dir, tmp_path):
    from tests.dicom_objects import encode
    from webapp.pacs.multipart import encode_related

    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        stack = stack_factory(database_url, tiny_model_dir, extra_env={
            "PACS_DESTINATION": f"{orthanc.url}/dicom-web"})
        png = real_xray_paths(1, "covid")[0]
        study = new_study()
        body, content_type = encode_related([encode(cxr_dataset(png, study))])
        stored = requests.post(f"{stack.base_url}/dicomweb/studies", data=body, timeout=30,
                               headers={**stack.headers, "Content-Type": content_type,
                                        "Accept": "application/dicom+json"})
        assert stored.status_code == 200, stored.text
        assert stack.wait(stored.headers["Location"].rsplit("/", 1)[1])["status"] == "succeeded"
        orthanc.wait_for(study["StudyInstanceUID"], 2)
        # Queried back over Orthanc's DICOMweb (QIDO-RS): the report and the heatmap, in the study.
        found = requests.get(f"{orthanc.url}/dicom-web/studies/{study['StudyInstanceUID']}/instances",
                             timeout=10).json()
        assert sorted(i["00080016"]["Value"][0] for i in found) == [
            "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.33"]
        patient = requests.get(f"{orthanc.url}/dicom-web/studies?StudyInstanceUID="
                               f"{study['StudyInstanceUID']}", timeout=10).json()[0]
        assert patient["00100020"]["Value"] == [PATIENT["PatientID"]]
        assert rows(database_url, "SELECT via, identifiers FROM dicom_origins") == [("stow", None)]
    finally:
        orthanc.stop()
