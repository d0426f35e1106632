"""The study state machine: the only code that changes a study's status.

    QUEUED --claim--> RUNNING --finish--> SUCCEEDED
       |                 |  \\--fail----> FAILED
       |                 \\--requeue--> QUEUED   (lost worker, transient error, sweeper)
       \\--fail--> FAILED                         (too many attempts, unreadable input)

Every change is a compare-and-set UPDATE, so two workers holding copies of
the same message cannot both win: ``claim`` hands out a token (the attempt
number) and only the holder of the latest token may finish or fail the study.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from webapp.models import Prediction, Study, utcnow

log = logging.getLogger(__name__)


class StudyStatus(enum.StrEnum):
    """Where a study is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TRANSITIONS: dict[StudyStatus, frozenset[StudyStatus]] = {
    StudyStatus.QUEUED: frozenset({StudyStatus.RUNNING, StudyStatus.FAILED}),
    StudyStatus.RUNNING: frozenset(
        {StudyStatus.SUCCEEDED, StudyStatus.FAILED, StudyStatus.QUEUED}
    ),
    StudyStatus.SUCCEEDED: frozenset(),
    StudyStatus.FAILED: frozenset(),
}
FINISHED = frozenset({StudyStatus.SUCCEEDED, StudyStatus.FAILED})
PENDING = frozenset({StudyStatus.QUEUED, StudyStatus.RUNNING})


class TransitionError(RuntimeError):
    """A status change the state machine does not allow."""


def can_transition(old: StudyStatus, new: StudyStatus) -> bool:
    """Whether the state machine allows old -> new."""
    return new in TRANSITIONS[old]


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def start_queued(study: Study) -> None:
    """Initial state of a new study, before it is added to the session."""
    if study.status is not None:
        raise TransitionError(f"study {study.id} already has status {study.status}")
    study.status = StudyStatus.QUEUED
    study.queued_at = utcnow()
    study.attempts = 0


@dataclass(frozen=True)
class Claim:
    """The right to work on a study: only the latest token may finish it."""

    study_id: str
    token: int


def claim(session: Session, study_id: str, max_attempts: int) -> Claim | None:
    """QUEUED (or RUNNING, on redelivery) -> RUNNING; None if finished, absent or out of attempts.

    A RUNNING study here means its last worker was lost; the redelivered
    message takes it over (RUNNING -> QUEUED -> RUNNING in one step).
    Commits.
    """
    now = utcnow()
    result = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.status.in_([s.value for s in PENDING]))
        .values(status=StudyStatus.RUNNING, started_at=now, attempts=Study.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.rollback()
        return None
    attempts = session.execute(select(Study.attempts).where(Study.id == study_id)).scalar_one()
    session.commit()
    token = Claim(study_id, attempts)
    if attempts > max_attempts:
        fail(
            session,
            token,
            "too_many_attempts",
            f"processing was interrupted {attempts - 1} times; giving up",
        )
        return None
    return token


def finish(session: Session, token: Claim, predictions: Iterable[Prediction]) -> bool:
    """RUNNING -> SUCCEEDED and the predictions, in one transaction. False if the token is stale."""
    # The UPDATE comes first: on PostgreSQL it locks the row, so a concurrent
    # finisher waits, then sees the changed attempt count and writes nothing.
    result = session.execute(
        update(Study)
        .where(
            Study.id == token.study_id,
            Study.status == StudyStatus.RUNNING,
            Study.attempts == token.token,
        )
        .values(
            status=StudyStatus.SUCCEEDED, finished_at=utcnow(), error_code=None, error_message=None
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.rollback()
        log.warning("event=finish_discarded study=%s token=%s", token.study_id, token.token)
        return False
    session.add_all(list(predictions))
    session.commit()
    return True


def fail(session: Session, token: Claim | str, code: str, message: str) -> bool:
    """QUEUED/RUNNING -> FAILED with a reason users can read. A Claim must still be current."""
    conditions = [Study.status.in_([s.value for s in PENDING])]
    if isinstance(token, Claim):
        study_id = token.study_id
        conditions.append(Study.attempts == token.token)
    else:
        study_id = token
    result = session.execute(
        update(Study)
        .where(Study.id == study_id, *conditions)
        .values(status=StudyStatus.FAILED, finished_at=utcnow(), error_code=code,
                error_message=message[:2000])
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def requeue(session: Session, study_id: str, *, token: Claim | None = None) -> bool:
    """RUNNING -> QUEUED (a transient error, or the sweeper finding a lost job). Commits."""
    conditions = [Study.status == StudyStatus.RUNNING]
    if token is not None:
        conditions.append(Study.attempts == token.token)
    result = session.execute(
        update(Study)
        .where(Study.id == study_id, *conditions)
        .values(status=StudyStatus.QUEUED, queued_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def attempts_so_far(session: Session, study_id: str) -> int:
    """How often the study was claimed (0 for new or unknown studies); reads only."""
    value = session.execute(select(Study.attempts).where(Study.id == study_id)).scalar_one_or_none()
    return int(value or 0)


def stale_studies(session: Session, older_than_s: float, limit: int = 500) -> list[str]:
    """Pending studies whose last state change is older than the deadline: re-enqueue candidates."""
    deadline = utcnow() - timedelta(seconds=older_than_s)
    rows = session.execute(
        select(Study.id, Study.status, Study.queued_at, Study.started_at)
        .where(Study.status.in_([s.value for s in PENDING]))
        .order_by(Study.created_at)
        .limit(limit)
    ).all()
    stale = []
    for study_id, status, queued_at, started_at in rows:
        since = started_at if status == StudyStatus.RUNNING else queued_at
        since = as_utc(since)
        if since is None or since < deadline:
            stale.append(study_id)
    return stale


def touch_queued(session: Session, study_id: str) -> None:
    """Restart a QUEUED study's deadline after re-sending its message (QUEUED -> QUEUED)."""
    session.execute(
        update(Study)
        .where(Study.id == study_id, Study.status == StudyStatus.QUEUED)
        .values(queued_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
