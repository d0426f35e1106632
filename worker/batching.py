"""Cross-job batching inside one worker process.

Task threads (Celery's threads pool) each decode and preprocess their own
study, then hand the model input to the one Batcher thread, which runs
whatever has arrived as one batch and does nothing else: the input gate,
labels and heatmaps are made back in each task's own thread, while the next
batch already runs. Decoding, preprocessing and that finishing work therefore
overlap inference, and under load the model sees full batches. The batcher waits for more input
only while other studies are known to be on their way (announced and still
decoding), and never longer than max_wait: a lone study runs at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml.backends import Outputs
from ml.predictor import Prediction, Predictor

log = logging.getLogger(__name__)


@dataclass
class _Request:
    batch: np.ndarray
    explain: bool
    done: threading.Event = field(default_factory=threading.Event)
    result: Outputs | None = None
    inference_ms: float = 0.0
    error: BaseException | None = None


class Ticket:
    """A study on its way to the batcher; submit it once, or cancel it (e.g. bad input)."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self._open = True

    def submit(self, batch: np.ndarray, images: Sequence[np.ndarray] | None, explain: bool,
               timeout: float | None = None,
               attributes: Sequence[Mapping[str, Any] | None] | None = None,
               statistics: Sequence[np.ndarray | None] | None = None) -> list[Prediction]:
        """Queue the preprocessed batch and wait for its predictions (attributes and the gate's
        statistics if already taken: per image, for the gate). images: the decoded originals,
        or None where the batch was prepared at intake (then every image's statistics).

        Heatmaps come back as normalised CAMs (Prediction.cam), not drawn: drawing them is
        left to whoever shows them (webapp/media/heatmaps.py).
        """
        request = _Request(batch, explain)
        self._batcher._enqueue(request, ticket=self)
        if not request.done.wait(timeout):
            raise TimeoutError("inference did not finish within the time limit")
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return self._batcher.predictor.finish(request.result, images, request.inference_ms,
                                              attributes, overlays=False, statistics=statistics)

    def cancel(self) -> None:
        """Stop the batcher waiting for this study (no-op after submit)."""
        self._batcher._close(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *_: object) -> None:
        self.cancel()


class Batcher:
    """Runs requests from many threads as few, larger model batches."""

    def __init__(self, predictor: Predictor, max_size: int = 16, max_wait_ms: float = 15) -> None:
        self.predictor = predictor
        self.max_size = max(1, max_size)
        self.max_wait = max(0.0, max_wait_ms / 1000.0)
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._incoming = 0
        self.batches_run = 0
        self.images_run = 0
        # One thread per lane: with several, a batch runs while the next one forms and starts.
        self._threads = [threading.Thread(target=self._loop, name=f"batcher-{lane}", daemon=True)
                         for lane in range(max(1, predictor.lanes))]
        for thread in self._threads:
            thread.start()

    def announce(self) -> Ticket:
        """Say a study is being decoded, so a forming batch may wait for it."""
        with self._cond:
            self._incoming += 1
        return Ticket(self)

    def _close(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket._open:
                ticket._open = False
                self._incoming -= 1
                self._cond.notify_all()

    def _enqueue(self, request: _Request, ticket: Ticket) -> None:
        with self._cond:
            if ticket._open:
                ticket._open = False
                self._incoming -= 1
            self._pending.append(request)
            self._cond.notify_all()

    def _take(self) -> list[_Request]:
        with self._cond:
            while not self._pending:
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            while (self._incoming > 0
                   and sum(len(r.batch) for r in self._pending) < self.max_size
                   and (remaining := deadline - time.monotonic()) > 0):
                self._cond.wait(remaining)
            taken, size = [], 0
            while self._pending and (not taken or size + len(self._pending[0].batch) <= self.max_size):
                request = self._pending.pop(0)
                taken.append(request)
                size += len(request.batch)
            return taken

    def _loop(self) -> None:
        while True:
            requests = self._take()
            try:
                explain = any(r.explain for r in requests)
                batch = np.concatenate([r.batch for r in requests])
                start = time.perf_counter()
                out = self.predictor.forward(batch, explain=explain)  # the gate's network too
                per_image_ms = (time.perf_counter() - start) * 1000.0 / len(batch)
                first = 0
                for r in requests:
                    part = slice(first, first + len(r.batch))
                    r.result = Outputs(out.probability[part], out.features[part],
                                       out.cam[part] if out.cam is not None and r.explain else None)
                    r.inference_ms = per_image_ms
                    first = part.stop
                with self._cond:
                    self.batches_run += 1
                    self.images_run += len(batch)
            except BaseException as exc:  # hand the error to every waiting study
                log.exception("event=batch_failed size=%d", len(requests))
                for r in requests:
                    r.error = exc
            finally:
                for r in requests:
                    r.done.set()
