"""The predictor, loaded lazily once per worker process (after the fork) and reloaded when the artifact changes."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ml.artifact import read_metadata

if TYPE_CHECKING:
    from ml.predictor import Predictor

log = logging.getLogger(__name__)
_lock = threading.Lock()
_cached: tuple[str, str, Predictor] | None = None


def get_predictor(model_dir: str | Path) -> Predictor:
    """The predictor for model_dir; raises ArtifactError when there is no usable model."""
    global _cached
    model_dir = str(model_dir)
    meta = read_metadata(model_dir)  # cheap: lets a new model be installed without a restart
    with _lock:
        if _cached and _cached[0] == model_dir and _cached[1] == meta.weights_sha256:
            return _cached[2]
        from ml.predictor import Predictor  # TensorFlow loads here, in the child, once

        predictor = Predictor.load(model_dir)
        _cached = (model_dir, predictor.metadata.weights_sha256, predictor)
        log.info("event=model_loaded version=%s dir=%s", predictor.metadata.model_version, model_dir)
        return predictor
