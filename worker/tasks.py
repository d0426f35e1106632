"""Thin Celery tasks: they take ids and delegate to worker.pipeline."""

from __future__ import annotations

from celery import shared_task
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import DBAPIError, OperationalError

from webapp.broker import queue_depth
from worker import pipeline

# Errors worth retrying: the database or broker blinked. Bad input never is.
TRANSIENT = (OperationalError, DBAPIError, RedisConnectionError)


@shared_task(
    name="worker.tasks.process_study",
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=6,
)
def process_study(study_id: str) -> str:
    """Run one study; safe to run twice (the second run is a no-op)."""
    return pipeline.run_study(study_id)


@shared_task(name="worker.tasks.requeue_stale_studies", autoretry_for=TRANSIENT, max_retries=2)
def requeue_stale_studies() -> int:
    """Re-send studies whose worker was lost or whose message was (the sweeper); drop the
    inputs prepared at intake for studies that are done."""
    pipeline.drop_prepared()
    return pipeline.requeue_stale(send=process_study.delay, queue_depth=queue_depth)
