"""What the web process says to and asks of the broker; it never imports the worker code."""

from __future__ import annotations

import logging

import redis
from celery import Celery
from flask import current_app

log = logging.getLogger(__name__)

PROCESS_STUDY = "worker.tasks.process_study"


def celery_app() -> Celery:
    """The Celery app bound to the current Flask app."""
    return current_app.extensions["celery"]


def enqueue_study(study_id: str) -> bool:
    """Send the hint "study X is ready"; the database row stays the truth.

    A broker outage is not the user's problem: the study is already stored as
    QUEUED and the sweeper re-sends it, so this only logs and returns False.
    """
    try:
        celery_app().send_task(PROCESS_STUDY, args=[study_id])
    except Exception as exc:  # kombu raises several unrelated types for "broker down"
        log.warning("event=enqueue_failed study=%s error=%s", study_id, type(exc).__name__)
        return False
    log.info("event=enqueued study=%s", study_id)
    return True


def redis_client() -> redis.Redis:
    """A short-timeout client on the broker, for health checks and queue depth."""
    url = celery_app().conf.broker_url
    return redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)


def queue_depth() -> int:
    """Messages waiting in the studies queue (Redis list length)."""
    return int(redis_client().llen(celery_app().conf.task_default_queue))


def workers_online(timeout: float = 1.0) -> list[str]:
    """Hostnames of workers that answer a ping within the timeout."""
    replies = celery_app().control.ping(timeout=timeout) or []
    return sorted(name for reply in replies for name in reply)


def worker_stats(timeout: float = 1.0) -> dict[str, dict]:
    """Each answering worker's `inspect stats` reply, by hostname."""
    return celery_app().control.inspect(timeout=timeout).stats() or {}
