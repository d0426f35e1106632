"""Run suspect studies alone in their worker process.

A study that was already claimed once may be what killed its last worker (a
decoder crash, memory exhaustion). Ordinary studies share the process
(shared hold); a suspect waits until the process is empty and keeps others
out (exclusive hold), so if it kills the worker again, no innocent study was
claimed alongside it and none loses an attempt.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Isolation:
    """A readers-writer lock, writers preferred so suspects are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    def would_wait(self, exclusive: bool) -> bool:
        """Whether hold(exclusive) would block right now (a hint: it may change at once)."""
        with self._cond:
            if exclusive:
                return self._exclusive or bool(self._shared)
            return self._exclusive or bool(self._waiting_exclusive)

    @contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        """Hold the process shared (ordinary study) or exclusively (suspect)."""
        with self._cond:
            if exclusive:
                self._waiting_exclusive += 1
                while self._exclusive or self._shared:
                    self._cond.wait()
                self._waiting_exclusive -= 1
                self._exclusive = True
            else:
                while self._exclusive or self._waiting_exclusive:
                    self._cond.wait()
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()
