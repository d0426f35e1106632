"""The DICOM storage listener (C-STORE SCP): `python -m webapp.pacs.listener`.

Each object is checked as it arrives (webapp/pacs/intake.py: the upload's limits and
errors); a bad one is refused with a DICOM failure status and an error comment naming
the upload's error code, and the association carries on. Objects of one
StudyInstanceUID become one study once none has arrived for DICOM_SETTLE_S; the study
is then stored and queued exactly like an upload. SIGTERM stores what is pending first.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts, build_context

from webapp.pacs import intake, where
from webapp.pacs.intake import INPUT_ERROR, OUT_OF_RESOURCES, STATUS_BY_CODE
from webapp.uploads import UploadError

log = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

VERIFICATION = "1.2.840.10008.1.1"
STORE_THREADS = 4


class Collector:
    """Gathers objects by StudyInstanceUID and stores each study after DICOM_SETTLE_S of quiet."""

    def __init__(self, app: Flask, owner_id: int, settle_s: float) -> None:
        self.app = app
        self.owner_id = owner_id
        self.settle_s = settle_s
        self._lock = threading.Lock()
        self._pending: dict[str, intake.PendingStudy] = {}
        self._unstored: list[intake.PendingStudy] = []  # the database refused them; retried
        self._pool = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="store")
        self.received = 0
        self.refused = 0
        self.stored = 0

    def receive(self, data: bytes, calling_ae: str | None, via: str = "dimse") -> tuple[int, str]:
        """Check and admit one object: (DICOM status, error comment)."""
        with self.app.app_context():
            try:
                arrival = intake.check(f"dicom-{self.received + 1}.dcm", data)
                pending = self._reserve(arrival, calling_ae, via)
                try:
                    intake.admit(pending, arrival)
                finally:
                    with self._lock:
                        pending.reserved -= 1
            except UploadError as exc:
                self.refused += 1
                log.warning("event=dicom_refused calling_ae=%s code=%s", calling_ae, exc.code)
                return STATUS_BY_CODE.get(exc.code, INPUT_ERROR), f"{exc.code}: {exc.message}"
            except Exception as exc:
                self.refused += 1
                # Type and place only: an exception's text may quote the object's values.
                log.error("event=dicom_receive_error calling_ae=%s error=%s at=%s", calling_ae,
                          type(exc).__name__, where(exc))
                return OUT_OF_RESOURCES, f"internal_error: {type(exc).__name__}"
        self.received += 1
        return 0x0000, ""

    def _reserve(self, arrival: intake.Arrival, calling_ae: str | None, via: str) -> intake.PendingStudy:
        with self._lock:
            pending = self._pending.get(arrival.study_uid)
            if pending is None:
                pending = intake.PendingStudy(arrival.study_uid, via, calling_ae, arrival.identifiers)
                self._pending[arrival.study_uid] = pending
            intake.check_room(pending)
            pending.reserved += 1
            pending.last_monotonic = time.monotonic()
            return pending

    def pending_count(self) -> int:
        """Studies received and not stored yet."""
        with self._lock:
            return len(self._pending) + len(self._unstored)

    def flush(self, force: bool = False) -> int:
        """Store every study quiet for the settle time (all of them with force); returns how many."""
        now = time.monotonic()
        with self._lock:
            due = [p for p in self._pending.values()
                   if p.reserved == 0 and p.images and (force or now - p.last_monotonic >= self.settle_s)]
            for pending in due:
                del self._pending[pending.study_uid]
            due, self._unstored = self._unstored + due, []
        # Storing waits on the database and the broker; a few threads overlap those waits.
        return sum(self._pool.map(self._store, due))

    def _store(self, pending: intake.PendingStudy) -> int:
        try:
            with self.app.app_context():
                study = intake.store(pending, self.owner_id)
        except Exception as exc:  # the database is down: keep it and try again next tick
            log.error("event=dicom_store_failed images=%d error=%s", len(pending.images),
                      type(exc).__name__)
            with self._lock:
                self._unstored.append(pending)
            return 0
        with self._lock:
            self.stored += 1
        log.info("event=dicom_study_queued study=%s images=%d via=%s calling_ae=%s quiet_ms=%.0f",
                 study.id, len(pending.images), pending.via, pending.calling_ae,
                 (time.monotonic() - pending.last_monotonic) * 1000)
        return 1


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]  # LO
    return status


def build_ae(app: Flask, collector: Collector) -> tuple[AE, list[Any]]:
    """The application entity and its C-STORE handler, configured from the app's settings."""
    config = app.config
    ae = AE(ae_title=config["DICOM_AE_TITLE"])
    ae.require_calling_aet = config["DICOM_ALLOWED_CALLING_AETS"]
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for large radiographs
    ae.maximum_associations = 32
    # Every storage SOP class and transfer syntax: what the service cannot read is refused
    # per object with a clear status, never by a failed negotiation the sender cannot explain.
    ae.supported_contexts = [build_context(c.abstract_syntax, ALL_TRANSFER_SYNTAXES)
                             for c in AllStoragePresentationContexts]
    ae.add_supported_context(VERIFICATION)

    def on_store(event: Any) -> Dataset:
        code, comment = collector.receive(event.encoded_dataset(), event.assoc.requestor.ae_title)
        return _status(code, comment)

    return ae, [(evt.EVT_C_STORE, on_store)]


def _owner_id(app: Flask) -> int:
    from webapp import accounts
    from webapp.extensions import db

    email = app.config["DICOM_OWNER_EMAIL"]
    if not email:
        sys.exit("DICOM_OWNER_EMAIL is not set: studies received over DICOM need an owner account")
    with app.app_context():
        user = accounts.find_user(email)
        owner = user.id if user is not None and user.active else None
        db.session.remove()
    if owner is None:
        sys.exit(f"DICOM_OWNER_EMAIL: no active account {email!r}; create it first "
                 "(flask --app webapp:create_app users create ...)")
    return owner


def serve(app: Flask, stop: threading.Event) -> int:
    """Listen until `stop` is set, storing settled studies as they come; returns an exit status."""
    config = app.config
    if not config["DICOM_ALLOWED_CALLING_AETS"]:
        sys.exit("DICOM_ALLOWED_CALLING_AETS is empty: the listener would refuse every association")
    collector = Collector(app, _owner_id(app), config["DICOM_SETTLE_S"])
    ae, handlers = build_ae(app, collector)
    server = ae.start_server((config["DICOM_BIND"], config["DICOM_PORT"]), block=False,
                             evt_handlers=handlers)
    log.info("event=dicom_listening ae_title=%s bind=%s port=%d settle_s=%.2f allowed=%s",
             config["DICOM_AE_TITLE"], config["DICOM_BIND"], config["DICOM_PORT"],
             config["DICOM_SETTLE_S"], ",".join(config["DICOM_ALLOWED_CALLING_AETS"]))
    tick = min(0.05, max(config["DICOM_SETTLE_S"] / 4, 0.005))
    try:
        while not stop.wait(tick):
            collector.flush()
    finally:
        server.shutdown()  # no new objects, then everything pending is stored
        collector.flush(force=True)
        left = collector.pending_count()
        log.info("event=dicom_stopped received=%d refused=%d studies=%d unstored=%d",
                 collector.received, collector.refused, collector.stored, left)
    return 1 if left else 0


def main() -> int:
    """Entry point: build the app (the same settings as web and workers) and serve."""
    from webapp import create_app

    app = create_app()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return serve(app, stop)


if __name__ == "__main__":
    sys.exit(main())
