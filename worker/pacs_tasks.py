"""Thin Celery tasks that send results back to the PACS: they take ids and delegate to webapp.pacs.sends."""

from __future__ import annotations

from celery import shared_task

from webapp.pacs import sends
from worker.tasks import TRANSIENT


@shared_task(
    name="worker.pacs_tasks.send_pacs_results",
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=6,
)
def send_pacs_results(send_id: int) -> str:
    """One attempt at delivering a study's report and heatmaps; safe to run twice."""
    outcome = sends.run_send(send_id)
    if outcome.retry_in is not None:
        # Later retries are the sweeper's (resend_pacs_results): the row holds the time.
        send_pacs_results.apply_async(args=[send_id], countdown=outcome.retry_in)
    return outcome.status


@shared_task(name="worker.pacs_tasks.resend_pacs_results", autoretry_for=TRANSIENT, max_retries=2)
def resend_pacs_results() -> int:
    """Re-send due and lost sends, and queue results whose study finished without a send (the sweeper)."""
    return sends.sweep(send=send_pacs_results.delay)
