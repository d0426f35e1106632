"""Live facts from the broker for the dashboard and /metrics; each answers None when unreachable."""

from __future__ import annotations

import logging
from typing import Any

from webapp.broker import queue_depth, worker_stats

log = logging.getLogger(__name__)
PROCESS_STUDY = "worker.tasks.process_study"


def queue_depth_now() -> int | None:
    """Messages waiting in the studies queue, or None when Redis does not answer."""
    try:
        return queue_depth()
    except Exception as exc:  # a dashboard must render with the broker down
        log.warning("event=queue_depth_failed error=%s", type(exc).__name__)
        return None


def workers(timeout: float = 1.0) -> list[dict[str, Any]] | None:
    """Workers that answer `inspect stats`: hostname, concurrency, studies processed since start."""
    try:
        replies = worker_stats(timeout)
    except Exception as exc:
        log.warning("event=inspect_failed error=%s", type(exc).__name__)
        return None
    return [
        {
            "hostname": name,
            "concurrency": (stats.get("pool") or {}).get("max-concurrency"),
            "pool": (stats.get("pool") or {}).get("implementation", "").rsplit(":", 1)[-1],
            "studies_done": (stats.get("total") or {}).get(PROCESS_STUDY, 0),
            "uptime_s": stats.get("uptime"),
        }
        for name, stats in sorted(replies.items())
    ]
