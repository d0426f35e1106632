"""`celery -A worker.celery_app worker` target: the Flask app's Celery, plus the worker's tasks."""

from __future__ import annotations

from celery.signals import worker_process_init

from webapp import create_app
from webapp.extensions import db

flask_app = create_app()
app = flask_app.extensions["celery"]

import worker.tasks  # noqa: E402,F401  (register the tasks on this app)


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Connections opened by the parent must not be shared with forked children.
    with flask_app.app_context():
        db.engine.dispose(close=False)
