"""The batcher and its predictor, loaded lazily once per worker process (after any fork)
and reloaded when the artifact changes."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ml.artifact import current_metadata
from ml.backends import usable_cpus
from ml.predictor import Predictor
from worker.batching import Batcher

log = logging.getLogger(__name__)
_lock = threading.Lock()
_cached: tuple[tuple[str, str, str, int], Batcher] | None = None


def get_batcher(model_dir: str | Path, backend: str = "auto", max_size: int = 16,
                max_wait_ms: float = 15, lanes: int = 0) -> Batcher:
    """The batcher over the predictor for model_dir; raises ArtifactError when there is no usable model.

    lanes: batches run at once (INFERENCE_LANES); 0 = one per usable CPU.
    """
    global _cached
    meta = current_metadata(model_dir)  # cheap: lets a new model be installed without a restart
    lanes = lanes or usable_cpus()
    key = (str(model_dir), meta.weights_sha256, backend, lanes)
    with _lock:
        if _cached and _cached[0] == key:
            return _cached[1]
        # The service never serves a model without its input gate (ArtifactError "no_gate").
        predictor = Predictor.load(model_dir, backend=backend, require_gate=True, lanes=lanes)
        batcher = Batcher(predictor, max_size=max_size, max_wait_ms=max_wait_ms)
        _cached = (key, batcher)
        gate = predictor.gate.version if predictor.gate else None
        log.info("event=model_loaded version=%s backend=%s lanes=%d gate=%s dir=%s",
                 predictor.metadata.model_version, predictor.backend.name, predictor.lanes, gate,
                 model_dir)
        return batcher

