"""pacs_sends: queued once per finished study, retried with backoff, identifiers deleted once delivered."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import func, select, update

from tests.webapp.rows import add_study
from webapp.extensions import db
from webapp.models import Prediction, utcnow
from webapp.pacs import sends, transport
from webapp.pacs.models import DicomOrigin, PacsSend
from webapp.pacs.sends import SendStatus

DESTINATION = {"kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 1,
               "label": "dicom://PACS@127.0.0.1:1"}
KEPT = {"study": {"00100020": {"vr": "LO", "Value": ["MRN-0042"]},
                  "0020000D": {"vr": "UI", "Value": ["1.2.3.4"]}},
        "images": [{"sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1", "sop_instance_uid": "1.2.3.4.5",
                    "series_instance_uid": "1.2.3.4.6"}]}


@pytest.fixture
def hints(monkeypatch) -> list:
    """Send hints that would go to the broker."""
    sent: list = []
    monkeypatch.setattr(sends, "enqueue_send", lambda send_id, countdown=None: sent.append(send_id))
    return sent


class FakePacs(list):
    """What the PACS received through transport.send; set .fail to make every send fail."""

    fail = False

    def send(self, datasets, destination, **_):
        if self.fail:
            raise transport.SendError("unreachable", "no association")
        self.append([ds.SOPClassUID for ds in datasets])
        return len(datasets)


@pytest.fixture
def delivered(monkeypatch) -> FakePacs:
    """transport.send replaced by a fake PACS."""
    pacs = FakePacs()
    monkeypatch.setattr(transport, "send", pacs.send)
    return pacs


def _from_pacs(app, status: str = "succeeded", abstained: bool = False) -> str:
    with app.app_context():
        study_id = add_study(None, status=status)
        db.session.add(DicomOrigin(study_id=study_id, via="dimse", calling_ae="PACS",
                                   identifiers=KEPT))
        if abstained:
            db.session.execute(update(Prediction).values(abstain_reason="not_frontal",
                                                         label="indeterminate"))
        db.session.commit()
        db.session.remove()
    return study_id


def _row(app, study_id: str) -> tuple[PacsSend | None, DicomOrigin]:
    with app.app_context():
        send = db.session.scalar(select(PacsSend).where(PacsSend.study_id == study_id))
        origin = db.session.get(DicomOrigin, study_id)
        db.session.expunge_all()
        db.session.remove()
    return send, origin


def test_nothing_is_sent_without_a_destination_and_the_identifiers_go(app, hints):
    study_id = _from_pacs(app)
    with app.app_context():
        assert sends.study_finished(study_id) is None
    send, origin = _row(app, study_id)
    assert send is None and origin.identifiers is None and origin.identifiers_deleted_at is not None
    with app.app_context():  # SQL NULL, not JSON null: the sweeper's IS NULL tests see it
        assert db.session.scalar(select(func.count()).select_from(DicomOrigin)
                                 .where(DicomOrigin.identifiers.is_(None))) == 1


def test_a_failed_study_sends_nothing_and_forgets_the_identifiers(app, hints):
    app.config["PACS_DESTINATION"] = DESTINATION
    study_id = _from_pacs(app, status="failed")
    with app.app_context():
        assert sends.study_finished(study_id) is None
    send, origin = _row(app, study_id)
    assert send is None and origin.identifiers is None and hints == []


def test_uploads_from_the_browser_are_not_sent(app, hints):
    app.config["PACS_DESTINATION"] = DESTINATION
    with app.app_context():
        study_id = add_study(None)
        assert sends.study_finished(study_id) is None
    assert hints == []


def test_a_study_is_queued_once_sent_and_its_identifiers_deleted(app, hints, delivered):
    app.config["PACS_DESTINATION"] = DESTINATION
    study_id = _from_pacs(app)
    with app.app_context():
        send_id = sends.study_finished(study_id)
        assert sends.study_finished(study_id) == send_id  # finishing twice queues nothing new
        assert sends.run_send(send_id).status == "sent"
        assert sends.run_send(send_id).status == "skipped"  # a duplicate message does nothing
    assert hints == [send_id, send_id]
    send, origin = _row(app, study_id)
    assert (send.status, send.attempts, send.objects, send.last_error) == ("sent", 1, 2, None)
    assert send.destination == DESTINATION["label"] and send.sent_at is not None
    assert origin.identifiers is None
    assert delivered == [["1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"]]


def test_an_abstained_image_sends_the_report_only(app, hints, delivered):
    app.config["PACS_DESTINATION"] = DESTINATION
    study_id = _from_pacs(app, abstained=True)
    with app.app_context():
        assert sends.run_send(sends.study_finished(study_id)).status == "sent"
    assert delivered == [["1.2.840.10008.5.1.4.1.1.88.33"]]


def test_failures_back_off_then_give_up_and_an_admin_can_retry(app, hints, delivered):
    app.config.update(PACS_DESTINATION=DESTINATION, PACS_SEND_MAX_ATTEMPTS=3,
                      PACS_RETRY_BASE_S=10, PACS_RETRY_MAX_S=15)
    delivered.fail = True
    study_id = _from_pacs(app)
    with app.app_context():
        send_id = sends.study_finished(study_id)
        outcome = sends.run_send(send_id)
        assert (outcome.status, outcome.retry_in) == ("retry", 10)
        assert sends.run_send(send_id).status == "skipped"  # not due yet
        waits = []
        for _ in range(2):
            send = db.session.get(PacsSend, send_id)
            # The wait runs from the failure; last_attempt_at is the attempt's start, so the
            # difference is the backoff plus the attempt itself (under a second, unless the
            # machine is busy: allow up to 3 s, far less than the step from 10 to 15).
            waits.append((send.next_attempt_at.replace(tzinfo=None)
                          - send.last_attempt_at.replace(tzinfo=None)).total_seconds())
            db.session.execute(update(PacsSend).values(next_attempt_at=utcnow()))
            db.session.commit()
            db.session.remove()
            last = sends.run_send(send_id)
        assert 10 <= waits[0] < 13 and 15 <= waits[1] < 18 and last.status == "failed"
    send, origin = _row(app, study_id)
    assert (send.status, send.attempts) == ("failed", 3)
    assert send.last_error == "unreachable: no association"
    assert origin.identifiers is not None  # kept for the retry
    delivered.fail = False
    with app.app_context():
        assert sends.retry(db.session, send_id)
        assert sends.run_send(send_id).status == "sent"
    send, origin = _row(app, study_id)
    assert (send.status, send.attempts) == ("sent", 1) and origin.identifiers is None


def test_the_sweeper_resends_due_and_lost_sends_and_queues_forgotten_studies(app, hints):
    app.config.update(PACS_DESTINATION=DESTINATION, STALE_AFTER_S=60)
    lost, forgotten = _from_pacs(app), _from_pacs(app)
    with app.app_context():
        lost_id = sends.study_finished(lost)
        db.session.execute(update(PacsSend).values(
            status=SendStatus.SENDING, attempts=1, last_attempt_at=utcnow() - timedelta(minutes=5)))
        db.session.commit()
        swept: list = []
        assert sends.sweep(send=swept.append) == 2
        assert swept == [lost_id]
        assert db.session.get(PacsSend, lost_id).status == SendStatus.PENDING
        forgotten_id = db.session.scalar(select(PacsSend.id).where(PacsSend.study_id == forgotten))
        assert forgotten_id is not None and hints == [lost_id, forgotten_id]
        counts = sends.status_counts(db.session)
        assert counts == {"pending": 2, "sending": 0, "sent": 0, "failed": 0}


def _scp(statuses: list[int]) -> tuple[object, int, list]:
    received: list = []

    def on_store(event):
        received.append(event.dataset.SOPClassUID)
        return statuses.pop(0) if statuses else 0x0000

    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, port, received


def _objects() -> list[Dataset]:
    from tests.webapp.pacs.test_reports import results
    from webapp.pacs import reports

    return reports.build_all(results())


def test_c_store_delivers_and_reports_refusals_and_unreachable_peers():
    server, port, received = _scp([0x0000, 0xA700])
    destination = {**DESTINATION, "port": port, "label": f"dicom://PACS@127.0.0.1:{port}"}
    try:
        with pytest.raises(transport.SendError) as refused:
            transport.send(_objects(), destination, calling_ae="COVIDCXR", timeout=5)
        assert refused.value.code == "store_refused" and "0xA700" in refused.value.message
        assert transport.send(_objects(), destination, calling_ae="COVIDCXR", timeout=5) == 2
        assert received == [ComprehensiveSRStorage, SecondaryCaptureImageStorage] * 2
        with pytest.raises(transport.SendError) as rejected:
            transport.send(_objects(), {**destination, "ae_title": "OTHER"}, calling_ae="X", timeout=5)
        assert rejected.value.code == "association_rejected"
    finally:
        server.shutdown()
    with pytest.raises(transport.SendError) as down:
        transport.send(_objects(), destination, calling_ae="COVIDCXR", timeout=2)
    assert down.value.code == "unreachable"


def _late_reactor(assoc) -> None:
    """Make pynetdicom's reactor thread wake late after each send, as it does on a loaded machine.

    Resumed after a C-STORE, the reactor sleeps until a reply sits in the queue (at most 1 s),
    and the sender's own blocking read starts 0.4 s late, so the reactor reaches a reply first
    whenever a send went out before it woke.
    """
    checkpoint, dimse = assoc._reactor_checkpoint, assoc.dimse
    wait, get_msg = checkpoint.wait, dimse.get_msg

    def late_wait(timeout=None):
        resumed = not checkpoint.is_set()
        woke = wait(timeout)
        deadline = time.monotonic() + 1.0
        while resumed and dimse.msg_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.001)
        return woke

    def late_get(block=False):
        if block:
            time.sleep(0.4)
        return get_msg(block)

    checkpoint.wait, dimse.get_msg = late_wait, late_get


def test_consecutive_stores_on_one_association_wait_for_the_reactor():
    server, port, received = _scp([])
    ae = AE(ae_title="COVIDCXR")
    ae.dimse_timeout = 2
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(sop_class)
    try:
        statuses = {}
        for name, send in (("pynetdicom", lambda assoc, ds: assoc.send_c_store(ds)),
                           ("transport.store", transport.store)):
            assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
            _late_reactor(assoc)
            statuses[name] = []
            for ds in _objects() * 2:  # a lost reply aborts the association: stop there
                status = send(assoc, ds)
                statuses[name].append(int(status.Status) if status else None)
                if not assoc.is_established:
                    break
            if assoc.is_established:
                assoc.release()
    finally:
        server.shutdown()
    # Unguarded, the reactor takes a reply off the queue and the sender waits in vain.
    assert statuses["pynetdicom"] == [0, None]
    assert statuses["transport.store"] == [0, 0, 0, 0]


def test_results_are_read_whole_before_heatmaps_are_drawn_and_kept(app):
    """Drawing a heatmap keeps it (a commit); the results must not be reloaded row by row after."""
    import numpy as np
    from sqlalchemy import event

    from ml.overlay import encode_cam

    with app.app_context():
        study_id = add_study(None, predictions=[(0.8, "covid"), (0.1, "no_covid")])
        db.session.add(DicomOrigin(study_id=study_id, via="dimse", calling_ae="PACS",
                                   identifiers=KEPT))
        db.session.execute(update(Prediction).values(
            heatmap_png=None, heatmap_cam=encode_cam(np.linspace(0, 1, 49).reshape(7, 7))))
        db.session.commit()
        db.session.remove()
        seen: list[str] = []

        def record(conn, cursor, statement, *args):
            seen.append(" ".join(statement.split()))

        event.listen(db.engine, "before_cursor_execute", record)
        try:
            results = sends.results_for(db.session, study_id)
        finally:
            event.remove(db.engine, "before_cursor_execute", record)
            db.session.remove()
    assert [(i.position, i.label, i.probability_covid) for i in results.images] == \
        [(0, "covid", 0.8), (1, "no_covid", 0.1)]
    assert all(i.heatmap_png.startswith(b"\x89PNG") for i in results.images)
    assert results.identifiers == KEPT["study"]
    drawn = [s for s in seen if s.startswith("UPDATE predictions SET heatmap_png")]
    assert len(drawn) == 2
    # After the first map is kept, only the second map's own statements: nothing reloaded.
    after = seen[seen.index(drawn[0]) + 1:]
    assert not [s for s in after if "FROM predictions" in s and "predictions.image_id =" not in s], after
    assert not [s for s in after if "FROM dicom_origins" in s or "FROM studies" in s], after
