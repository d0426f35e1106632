"""`celery -A worker.celery_app worker` target: the Flask app's Celery, plus the worker's tasks."""

from __future__ import annotations

import logging

from celery.signals import worker_process_init

from ml.artifact import ArtifactError
from webapp import create_app
from webapp.extensions import db
from worker.model_cache import get_predictor

flask_app = create_app()
app = flask_app.extensions["celery"]
# Loading TensorFlow and the model in a fresh child takes seconds; let it.
app.conf.worker_proc_alive_timeout = 120

import worker.tasks  # noqa: E402,F401  (register the tasks on this app)

log = logging.getLogger(__name__)


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Connections opened by the parent must not be shared with forked children.
    with flask_app.app_context():
        db.engine.dispose(close=False)
    # Load the model now, in the child (never before the fork), so the first
    # study does not pay for it. No model is not fatal: studies fail with a reason.
    try:
        get_predictor(flask_app.config["MODEL_DIR"]).warm_up(explain=flask_app.config["GRADCAM"])
    except ArtifactError as exc:
        log.warning("event=model_unavailable code=%s message=%s", exc.code, exc.message)
