"""Group commit: the database work of studies that reach the same point together, done as one.

A worker's task threads arrive at their claim, and at their finish, in
bunches: the studies of one model batch come back from the batcher at the
same moment. Each call of a Group hands in its item; the first caller that
finds no run in progress runs everyone's items gathered so far in one call
of `run` (one statement and one commit, webapp.jobs.claim_many and
finish_many) and the others wait for their share of the result. A lone
study runs at once, and nothing waits on a timer: while one run is in the
database, the next callers gather behind it. If the run raises, every
caller of it gets the exception (for the task, a transient database error,
retried as before).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Call(Generic[Item, Result]):
    item: Item
    done: bool = False
    result: Result | None = None
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class Group(Generic[Item, Result]):
    """Runs `run(items) -> results` (one result per item, in order) for calls gathered while
    the previous run ran; at most max_size items per run."""

    def __init__(self, run: Callable[[Sequence[Item]], Sequence[Result]], max_size: int = 64,
                 ) -> None:
        self._run = run
        self.max_size = max(1, max_size)
        self._lock = threading.Lock()
        self._waiting: list[_Call[Item, Result]] = []
        self._running = False
        self.runs = 0
        self.items = 0

    def __call__(self, item: Item) -> Result:
        call: _Call[Item, Result] = _Call(item)
        with self._lock:
            self._waiting.append(call)
        while True:
            with self._lock:
                if call.done:
                    break
                leader = not self._running
                if leader:
                    self._running = True
                    taken = self._waiting[:self.max_size]
                    del self._waiting[:self.max_size]
                else:
                    call.ready.clear()  # under the lock: a later set() is never lost
            if leader:
                self._lead(taken)
            else:
                call.ready.wait(0.05)  # woken by the run that took it, or to lead the next
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _lead(self, taken: list[_Call[Item, Result]]) -> None:
        try:
            results = list(self._run([c.item for c in taken]))
            if len(results) != len(taken):
                raise RuntimeError(f"{len(results)} results for {len(taken)} items")
            for c, r in zip(taken, results, strict=True):
                c.result = r
        except BaseException as exc:
            for c in taken:
                c.error = exc
        with self._lock:
            self._running = False
            self.runs += 1
            self.items += len(taken)
            for c in taken:
                c.done = True
            waiting = list(self._waiting)
        for c in taken:
            c.ready.set()
        if waiting:  # the next run's leader: whoever of them wakes first
            waiting[0].ready.set()
