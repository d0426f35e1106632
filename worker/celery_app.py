"""`celery -A worker.celery_app worker` target: the Flask app's Celery, plus the worker's tasks."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_process_init

from ml.artifact import ArtifactError
from webapp import create_app
from webapp.extensions import db
from worker.model_cache import get_batcher

flask_app = create_app()
app = flask_app.extensions["celery"]
# Loading TensorFlow and the model in a fresh child takes seconds; let it.
app.conf.worker_proc_alive_timeout = 120

import worker.pacs_tasks  # noqa: E402,F401  (results back to the PACS)
import worker.tasks  # noqa: E402,F401  (register the tasks on this app)

log = logging.getLogger(__name__)


def _preload() -> None:
    # Load the model now so the first study does not pay for it. No model is
    # not fatal: studies fail with a reason, and a model installed later is picked up.
    config = flask_app.config
    try:
        get_batcher(config["MODEL_DIR"], config["INFERENCE_BACKEND"], config["BATCH_MAX_SIZE"],
                    config["BATCH_MAX_WAIT_MS"], config["INFERENCE_LANES"]).predictor.warm_up(explain=config["GRADCAM"])
    except ArtifactError as exc:
        log.warning("event=model_unavailable code=%s message=%s", exc.code, exc.message)


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Prefork children: connections opened by the parent must not be shared.
    with flask_app.app_context():
        db.engine.dispose(close=False)
    _preload()


@worker_init.connect
def _in_main_process(sender: Any = None, **_: object) -> None:
    # Threads/solo pools run tasks in this process; prefork children load their own
    # copy after the fork (never before it), so the parent must not.
    pool = getattr(sender, "pool_cls", None)
    name = getattr(pool, "__module__", str(pool or ""))
    if "prefork" not in name:
        _preload()
