"""Heartbeats on the studies this worker process has in hand: the sweeper's sign that their worker lives.

Every claim a task holds is registered here, and so is a study delivered to
this process but still waiting to run alone (worker/isolation.py); one daemon
thread per process renews them all in one UPDATE every HEARTBEAT_S
(jobs.heartbeat). When the process dies, the beats stop, and once a study's
heartbeat is older than LEASE_S the sweeper re-enqueues it: a dead worker
costs its studies about LEASE_S + SWEEP_INTERVAL_S, not the broker's
visibility timeout. The thread starts with the first study, so after any
fork, in the process that runs the task.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app

from webapp import jobs
from webapp.extensions import db

log = logging.getLogger(__name__)


class Leases:
    """The studies one worker process has in hand, and the thread that keeps them alive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[jobs.Claim, int] = {}  # claim -> holders (normally 1)
        self._waiting: dict[str, int] = {}  # study id -> tasks holding its message, unclaimed
        self._thread: threading.Thread | None = None
        self._pid = 0

    @contextmanager
    def waiting(self, study_id: str, mark_now: bool) -> Iterator[None]:
        """Keep a delivered, not yet claimed study beating while the block runs.

        With `mark_now` (the task is about to wait its turn), its first
        heartbeat is written at once: from then on, the sweeper re-sends it
        LEASE_S after this process stops beating.
        """
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        with self._lock:
            self._waiting[study_id] = self._waiting.get(study_id, 0) + 1
            self._ensure_thread(app)
        try:
            if mark_now:
                jobs.heartbeat(db.session, [], [study_id])
                db.session.remove()
            yield
        finally:
            with self._lock:
                if study_id in self._waiting:  # else claimed meanwhile (hold took it over)
                    self._waiting[study_id] -= 1
                    if not self._waiting[study_id]:
                        del self._waiting[study_id]

    @contextmanager
    def hold(self, token: jobs.Claim) -> Iterator[None]:
        """Keep `token`'s study beating while the block runs (the claim already set heartbeat_at)."""
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        with self._lock:
            self._held[token] = self._held.get(token, 0) + 1
            self._waiting.pop(token.study_id, None)  # claimed: it beats by its token now
            self._ensure_thread(app)
        try:
            yield
        finally:
            with self._lock:
                self._held[token] -= 1
                if not self._held[token]:
                    del self._held[token]

    def held(self) -> list[jobs.Claim]:
        """The claims held right now."""
        with self._lock:
            return list(self._held)

    def beat(self) -> set[str]:
        """Renew every held claim and waiting study once (needs an app context); returns the ids renewed."""
        tokens = self.held()
        with self._lock:
            waiting = list(self._waiting)
        try:
            renewed = jobs.heartbeat(db.session, tokens, waiting)
        finally:
            db.session.remove()
        with self._lock:
            still_held = set(self._held)  # a study that finished meanwhile is not lost
        for token in tokens:
            if token.study_id not in renewed and token in still_held:
                # Taken over or requeued: whatever this process writes for it now is discarded.
                log.warning("event=lease_lost study=%s token=%s", token.study_id, token.token)
        return renewed

    def _ensure_thread(self, app: Flask) -> None:
        # A forked child inherits the object but not the thread: start one per process.
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, args=(app,), name="lease-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _run(self, app: Flask) -> None:
        interval = float(app.config["HEARTBEAT_S"])
        while True:  # as long as the process: a daemon thread
            time.sleep(interval)
            with self._lock:
                if not self._held and not self._waiting:
                    continue
            try:
                with app.app_context():
                    self.beat()
            except Exception as exc:  # the database blinked: the next beat tries again
                log.warning("event=heartbeat_failed error=%s", type(exc).__name__)
