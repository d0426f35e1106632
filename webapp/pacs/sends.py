"""Results on their way back to the PACS: the only code that changes a pacs_sends row.

    (study finishes) -> PENDING --claim--> SENDING --delivered--> SENT   (identifiers deleted)
                                             |-- failed ------> PENDING (retry after a backoff)
                                             |-- failed ------> FAILED  (out of attempts)
    SENDING --sweep (worker lost)--> PENDING;   FAILED --retry (an admin)--> PENDING

Like studies, every move is a compare-and-set UPDATE and the attempt number is the claim
token, so a task delivered twice, a retry message and the sweeper cannot send the same
results twice at once; and the objects keep their UIDs (reports.derived_uid), so a send
repeated after a lost answer stores nothing new in the PACS.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flask import current_app
from sqlalchemy import func, null, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from webapp.broker import celery_app
from webapp.extensions import db
from webapp.jobs import FINISHED, StudyStatus
from webapp.media.heatmaps import overlay_for
from webapp.models import Image, Prediction, Study, utcnow
from webapp.pacs import reports, transport, where
from webapp.pacs.models import DicomOrigin, PacsSend
from webapp.serializers import abstain_message

log = logging.getLogger(__name__)

SEND_TASK = "worker.pacs_tasks.send_pacs_results"
# Retries due sooner than this go out as a delayed message; later ones wait for the sweeper
# (a delayed message held past the broker's visibility timeout would be delivered twice).
COUNTDOWN_MAX_S = 300.0


class SendStatus(enum.StrEnum):
    """Where a study's results are on their way to the PACS."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class SendClaim:
    """The right to make one attempt: only the latest attempt number may record its outcome."""

    send_id: int
    study_id: str
    attempt: int


@dataclass(frozen=True)
class Outcome:
    """What one run did: status is sent/retry/failed/skipped; retry_in for a delayed message."""

    status: str
    retry_in: float | None = None


def _forget_identifiers(session: Session, study_id: str) -> None:
    session.execute(
        update(DicomOrigin)
        .where(DicomOrigin.study_id == study_id, DicomOrigin.identifiers.is_not(None))
        .values(identifiers=null(), identifiers_deleted_at=utcnow())
    )


def study_finished(study_id: str) -> int | None:
    """After a study's final status: queue its results for the PACS, or drop the identifiers
    when nothing will be sent (a failed study, no destination). Returns the send id, if any."""
    session = db.session
    row = session.execute(
        select(Study.status, DicomOrigin.identifiers)
        .join(DicomOrigin, DicomOrigin.study_id == Study.id)
        .where(Study.id == study_id)
    ).one_or_none()
    if row is None or row.identifiers is None or StudyStatus(row.status) not in FINISHED:
        session.remove()
        return None
    destination = current_app.config["PACS_DESTINATION"]
    if row.status != StudyStatus.SUCCEEDED or destination is None:
        _forget_identifiers(session, study_id)
        session.commit()
        session.remove()
        log.info("event=pacs_nothing_to_send study=%s", study_id)
        return None
    send = PacsSend(study_id=study_id, destination=destination["label"],
                    status=SendStatus.PENDING, attempts=0, objects=0)
    session.add(send)
    try:
        session.commit()
        send_id = send.id
    except IntegrityError:  # already queued: finishing twice queues nothing new
        session.rollback()
        send_id = session.execute(select(PacsSend.id).where(PacsSend.study_id == study_id)).scalar_one()
    session.remove()
    enqueue_send(send_id)
    return send_id


def after_study(study_id: str) -> None:
    """The worker's hook once a study is final: study_finished, never raising (the sweeper catches up)."""
    try:
        study_finished(study_id)
    except Exception as exc:
        db.session.remove()
        log.warning("event=pacs_queue_failed study=%s error=%s", study_id, type(exc).__name__)


def enqueue_send(send_id: int, countdown: float | None = None) -> bool:
    """Hint a worker to attempt the send; the row stays the truth (the sweeper re-sends)."""
    try:
        celery_app().send_task(SEND_TASK, args=[send_id], countdown=countdown)
    except Exception as exc:  # kombu raises several unrelated types for "broker down"
        log.warning("event=pacs_enqueue_failed send=%s error=%s", send_id, type(exc).__name__)
        return False
    return True


def claim(session: Session, send_id: int) -> SendClaim | None:
    """PENDING and due -> SENDING with attempts + 1; None if not pending, not due or absent. Commits."""
    moved = session.execute(
        update(PacsSend)
        .where(PacsSend.id == send_id, PacsSend.status == SendStatus.PENDING,
               PacsSend.next_attempt_at <= utcnow())
        .values(status=SendStatus.SENDING, attempts=PacsSend.attempts + 1, last_attempt_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if moved != 1:
        session.rollback()
        return None
    study_id, attempt = session.execute(
        select(PacsSend.study_id, PacsSend.attempts).where(PacsSend.id == send_id)).one()
    session.commit()
    return SendClaim(send_id, study_id, attempt)


def _move(session: Session, token: SendClaim, **values: Any) -> bool:
    return session.execute(
        update(PacsSend)
        .where(PacsSend.id == token.send_id, PacsSend.status == SendStatus.SENDING,
               PacsSend.attempts == token.attempt)
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount == 1


def delivered(session: Session, token: SendClaim, objects: int) -> bool:
    """SENDING -> SENT, and the original identifiers deleted, in one transaction. Commits."""
    if not _move(session, token, status=SendStatus.SENT, sent_at=utcnow(), objects=objects,
                 last_error=None):
        session.rollback()
        return False
    _forget_identifiers(session, token.study_id)
    session.commit()
    return True


def backoff_s(attempt: int, base: float, cap: float) -> float:
    """Seconds before the next attempt after `attempt` failed ones: base, 2 base, 4 base ... cap."""
    return min(cap, base * 2 ** max(0, attempt - 1))


def failed(session: Session, token: SendClaim, error: str, config: Any) -> float | None:
    """SENDING -> PENDING after a backoff, or FAILED past the attempts; the delay, or None. Commits."""
    if token.attempt >= config["PACS_SEND_MAX_ATTEMPTS"]:
        _move(session, token, status=SendStatus.FAILED, last_error=error[:2000])
        session.commit()
        return None
    delay = backoff_s(token.attempt, config["PACS_RETRY_BASE_S"], config["PACS_RETRY_MAX_S"])
    _move(session, token, status=SendStatus.PENDING, last_error=error[:2000],
          next_attempt_at=utcnow() + timedelta(seconds=delay))
    session.commit()
    return delay


def retry(session: Session, send_id: int) -> bool:
    """FAILED -> PENDING now, with a fresh count of attempts (an admin's retry). Commits."""
    moved = session.execute(
        update(PacsSend).where(PacsSend.id == send_id, PacsSend.status == SendStatus.FAILED)
        .values(status=SendStatus.PENDING, attempts=0, next_attempt_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    session.commit()
    return moved


def results_for(session: Session, study_id: str) -> reports.StudyResults | None:
    """The study's results and original identifiers, read in one short session."""
    origin = session.get(DicomOrigin, study_id)
    study = session.get(Study, study_id)
    if origin is None or study is None or origin.identifiers is None:
        return None
    rows = session.execute(
        select(Image.position, Prediction)
        .join(Prediction, Prediction.image_id == Image.id)
        .where(Image.study_id == study_id)
        .order_by(Image.position)
    ).all()
    references = origin.identifiers.get("images") or []
    kept, finished_at = origin.identifiers["study"], study.finished_at or utcnow()
    # Every value read before the first heatmap is drawn: drawing one keeps it (a commit),
    # which would expire these objects and reload each one.
    fields = [
        dict(
            position=position,
            reference=references[position] if position < len(references) else None,
            probability_covid=p.probability_covid,
            label=p.label,
            threshold=p.threshold,
            abstain_reason=p.abstain_reason,
            abstain_message=abstain_message(p.abstain_reason),
            model_version=p.model_version,
            model_sha256=p.model_sha256,
            model_trained=p.model_trained,
        )
        for position, p in rows
    ]
    image_ids = [p.image_id for _, p in rows]
    if not fields:
        return None
    images = [reports.ImageResult(**f, heatmap_png=overlay_for(session, image_id))
              for f, image_id in zip(fields, image_ids, strict=True)]
    return reports.StudyResults(study_id, finished_at, kept, images)


def run_send(send_id: int) -> Outcome:
    """One attempt: claim, build the report and heatmaps, deliver, record; safe to run twice."""
    config = current_app.config
    session = db.session
    token = claim(session, send_id)
    if token is None:
        session.remove()
        return Outcome("skipped")
    results = results_for(session, token.study_id)
    session.remove()
    destination = config["PACS_DESTINATION"]
    try:
        if destination is None:
            raise transport.SendError("no_destination", "PACS_DESTINATION is not set")
        if results is None:
            raise transport.SendError("no_results", "the study has no results or no identifiers")
        objects = transport.send(reports.build_all(results), destination,
                                 calling_ae=config["DICOM_AE_TITLE"],
                                 timeout=config["PACS_TIMEOUT_S"],
                                 authorization=config["PACS_STOW_AUTHORIZATION"])
    except transport.SendError as exc:
        return _after_failure(token, f"{exc.code}: {exc.message}", config)
    except Exception as exc:  # a bug must not leave the send SENDING until the sweeper comes
        # Type and place only: the objects carry patient identifiers an error text may quote.
        log.error("event=pacs_send_error send=%s study=%s error=%s at=%s", send_id,
                  token.study_id, type(exc).__name__, where(exc))
        return _after_failure(token, f"internal_error: {type(exc).__name__}", config)
    won = delivered(session, token, objects)
    session.remove()
    log.info("event=pacs_sent send=%s study=%s objects=%d attempt=%d won=%s", send_id,
             token.study_id, objects, token.attempt, won)
    return Outcome("sent")


def _after_failure(token: SendClaim, error: str, config: Any) -> Outcome:
    delay = failed(db.session, token, error, config)
    db.session.remove()
    log.warning("event=pacs_send_failed send=%s study=%s attempt=%d error=%s retry_in=%s",
                token.send_id, token.study_id, token.attempt, error.split(":")[0], delay)
    if delay is None:
        return Outcome("failed")
    return Outcome("retry", delay if delay <= COUNTDOWN_MAX_S else None)


def sweep(send: Callable[[int], object]) -> int:
    """The sweeper: re-send due sends, free sends a lost worker left SENDING, and queue results
    of finished studies whose hook never ran. Returns how many sends were hinted."""
    session = db.session
    now = utcnow()
    lost_before = now - timedelta(seconds=current_app.config["STALE_AFTER_S"])
    session.execute(
        update(PacsSend)
        .where(PacsSend.status == SendStatus.SENDING, PacsSend.last_attempt_at < lost_before)
        .values(status=SendStatus.PENDING, next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    orphans = session.scalars(
        select(DicomOrigin.study_id)
        .join(Study, Study.id == DicomOrigin.study_id)
        .outerjoin(PacsSend, PacsSend.study_id == DicomOrigin.study_id)
        .where(DicomOrigin.identifiers.is_not(None), PacsSend.id.is_(None),
               Study.status.in_([s.value for s in FINISHED]))
        .limit(500)
    ).all()
    due = session.scalars(
        select(PacsSend.id).where(PacsSend.status == SendStatus.PENDING,
                                  PacsSend.next_attempt_at <= now).limit(500)
    ).all()
    session.remove()
    for study_id in orphans:
        study_finished(study_id)  # hints its own send
    for send_id in due:
        send(send_id)
    return len(due) + len(orphans)


def status_counts(session: Session) -> dict[str, int]:
    """How many sends are in each status (the dashboard)."""
    rows = session.execute(select(PacsSend.status, func.count()).group_by(PacsSend.status)).all()
    counts = {s.value: 0 for s in SendStatus}
    counts.update({status: int(n) for status, n in rows})
    return counts


def recent(session: Session, status: str | None = None, limit: int = 200) -> list[PacsSend]:
    """The latest sends, newest first, optionally of one status (the admin page)."""
    query = select(PacsSend).order_by(PacsSend.created_at.desc(), PacsSend.id.desc()).limit(limit)
    if status:
        query = query.where(PacsSend.status == status)
    return list(session.scalars(query))
