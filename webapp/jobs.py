"""The study state machine: the only code that changes a study's status.

    QUEUED  --claim-------->  RUNNING    a worker takes the study
    QUEUED  --touch_queued->  QUEUED     the sweeper re-sent its message
    QUEUED  --fail--------->  FAILED     the sweeper requeued it, but its worker, token still
                                         current, was alive and failed it (or fail by study id)
    RUNNING --claim-------->  RUNNING    redelivery: a new worker takes over from a lost one
    RUNNING --finish------->  SUCCEEDED
    RUNNING --fail--------->  FAILED     bad input, no model, timeout, unexpected error
    RUNNING --requeue------>  QUEUED     the sweeper found a lost job

``TRANSITIONS`` lists every move; ``transition()`` is the one place that
performs one. It refuses a move the table does not list before any SQL runs,
and otherwise makes a compare-and-set UPDATE guarded by the allowed source
states (and, for a claim holder, the claim token), so two workers holding
copies of the same message cannot both win: ``claim`` hands out a token (the
attempt number) and only the holder of the latest token may finish or fail
the study. ``claim``, ``finish``, ``fail``, ``requeue`` and ``touch_queued`` are
the moves callers use; each is one ``transition()`` plus its commit.

``heartbeat`` is no move: the worker holding a claim renews its study's
``heartbeat_at`` while it runs (guarded by the token, like finish), and
``stale_studies`` tells the sweeper which RUNNING studies stopped beating.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, Update, and_, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from webapp.models import Prediction, Study, as_utc, utcnow

log = logging.getLogger(__name__)


class StudyStatus(enum.StrEnum):
    """Where a study is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# Every move a study can make, and nothing else (tests/webapp/test_transitions.py
# checks that the functions below make exactly these moves).
TRANSITIONS: dict[StudyStatus, frozenset[StudyStatus]] = {
    StudyStatus.QUEUED: frozenset({
        StudyStatus.RUNNING,  # claim
        # fail: a worker the sweeper wrongly took for lost fails its study with a
        # still-current token (requeue leaves attempts alone), or fail by study id.
        StudyStatus.FAILED,
        # touch_queued: the sweeper re-sent the message of a study nobody picked
        # up, so its deadline (queued_at) restarts; the status stays QUEUED.
        StudyStatus.QUEUED,
    }),
    StudyStatus.RUNNING: frozenset({
        StudyStatus.SUCCEEDED,  # finish
        StudyStatus.FAILED,  # fail (timeout, bad input, no model, too many attempts)
        StudyStatus.QUEUED,  # requeue (the sweeper finding a lost job)
        # claim on redelivery: the last worker was lost and the broker delivered
        # the message again; the new worker takes over with a new token (one
        # step for RUNNING -> QUEUED -> RUNNING), which makes the old token stale.
        StudyStatus.RUNNING,
    }),
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


def start_queued(study: Study) -> None:
    """Initial state of a new study, before it is added to the session (not a move: no old status)."""
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


# The moves are statements on the table, not the mapped class: nothing in a session needs
# them, and the ORM's bulk-UPDATE path cost about 0.15-0.3 ms of CPU per move, two a study.
_STUDIES = Study.__table__
_COLUMNS = _STUDIES.c

# Conditions a move may add to its compare-and-set, by name (values bound at execution).
_GUARDS: dict[str, ColumnElement[bool]] = {
    # claim on redelivery: the study's last worker stopped beating before lease_cutoff.
    "lease_lost": or_(_COLUMNS.status == StudyStatus.QUEUED.value, _COLUMNS.heartbeat_at.is_(None),
                      _COLUMNS.heartbeat_at < bindparam("lease_cutoff")),
    # claim of a study no worker ever took.
    "never_claimed": _COLUMNS.attempts == 0,
}


def _on_entry(target: StudyStatus) -> dict[str, Any]:
    """The columns every move into `target` sets besides the status (the time bound as `now`)."""
    now = bindparam("now", type_=_COLUMNS.queued_at.type)
    if target is StudyStatus.QUEUED:
        return {"queued_at": now}
    if target is StudyStatus.RUNNING:
        return {"started_at": now, "heartbeat_at": now, "attempts": _COLUMNS.attempts + 1}
    if target is StudyStatus.SUCCEEDED:
        return {"finished_at": now, "error_code": None, "error_message": None}
    return {"finished_at": now}


@functools.cache
def _statement(sources: frozenset[StudyStatus], target: StudyStatus, with_token: bool,
               guard: str | None, field_names: tuple[str, ...]) -> Update:
    """The UPDATE of one kind of move, built once: a worker makes two a study, and building
    and keying the statement each time cost more than running it."""
    guards = [_COLUMNS.id == bindparam("study_id"),
              _COLUMNS.status.in_(sorted(s.value for s in sources))]
    if with_token:
        guards.append(_COLUMNS.attempts == bindparam("token"))
    if guard is not None:
        guards.append(_GUARDS[guard])
    values = {**_on_entry(target),
              **{name: bindparam(f"set_{name}", type_=_COLUMNS[name].type) for name in field_names},
              "status": target.value}
    return update(_STUDIES).where(*guards).values(values).returning(_COLUMNS.attempts)


def transition(
    session: Session,
    study_id: str,
    sources: StudyStatus | Iterable[StudyStatus],
    target: StudyStatus,
    *,
    token: Claim | None = None,
    guard: str | None = None,
    guard_params: Mapping[str, Any] | None = None,
    **fields: Any,
) -> int | None:
    """Move one study from any of `sources` to `target`; its attempt count after the move if
    this call made it, None if not.

    A move the table does not list (any source -> target not in TRANSITIONS)
    is a bug in the caller, not a race: it raises TransitionError before any
    SQL runs. An allowed move is one compare-and-set UPDATE, guarded by the
    study's status being one of `sources` and, when `token` is given, by
    `attempts` still being the token, and by the named `guard` if given (a
    claim's: "lease_lost" with `guard_params` {"lease_cutoff": time}, or
    "never_claimed"); it sets the status, the timestamps of the target
    (queued_at, started_at and attempts + 1, or finished_at; a success clears
    the error) and any extra columns in `fields` (a failure's error_code and
    error_message). It returns None, changing nothing, when no row matched:
    the study is absent, in another state, or the token is stale; otherwise
    the row's `attempts` as the UPDATE left it (RETURNING: a claim learns its
    token without a second statement). Does not commit: the caller commits,
    or rolls back, after adding what belongs to the same transaction.
    """
    sources = frozenset({sources} if isinstance(sources, StudyStatus) else sources)
    if not sources:
        raise ValueError("a transition needs at least one source state")
    forbidden = sorted(s.value for s in sources if not can_transition(s, target))
    if forbidden:
        raise TransitionError(
            f"study {study_id}: {', '.join(forbidden)} -> {target.value} is not in TRANSITIONS"
        )
    names = tuple(sorted(fields))
    statement = _statement(sources, target, token is not None, guard, names)
    params: dict[str, Any] = {"study_id": study_id, "now": utcnow(), **(guard_params or {})}
    if token is not None:
        params["token"] = token.token
    params.update({f"set_{name}": fields[name] for name in names})
    return session.execute(statement, params).scalar_one_or_none()


def claim(session: Session, study_id: str, max_attempts: int,
          lease_s: float | None = None, *, first: bool = False) -> Claim | None:
    """QUEUED (or RUNNING, on redelivery) -> RUNNING; None if finished, absent, still
    beating elsewhere or out of attempts.

    A redelivered message of a RUNNING study takes it over (RUNNING -> QUEUED
    -> RUNNING in one step) only when its last worker was lost: with
    `lease_s`, when no heartbeat came for that long. A study whose worker
    still beats is left to it (the broker re-offers messages after its
    visibility timeout whatever the worker is doing). With `first`, only a
    study never claimed before (attempts 0) is taken: the worker's one-statement
    path for the usual case, which needs no look at the study first. Commits.
    """
    guard, params = None, None
    if first:
        guard = "never_claimed"  # no worker can be on it
    elif lease_s is not None:
        guard, params = "lease_lost", {"lease_cutoff": utcnow() - timedelta(seconds=lease_s)}
    attempts = transition(session, study_id, PENDING, StudyStatus.RUNNING, guard=guard,
                          guard_params=params)
    if attempts is None:
        session.rollback()
        return None
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


def finish(session: Session, token: Claim, predictions: Iterable[Mapping[str, Any]]) -> bool:
    """RUNNING -> SUCCEEDED and the predictions (each a row's column values, the same columns
    in each), in one transaction. False if the token is stale."""
    # The UPDATE comes first: on PostgreSQL it locks the row, so a concurrent
    # finisher waits, then sees the changed attempt count and writes nothing.
    if transition(session, token.study_id, StudyStatus.RUNNING, StudyStatus.SUCCEEDED,
                  token=token) is None:
        session.rollback()
        log.warning("event=finish_discarded study=%s token=%s", token.study_id, token.token)
        return False
    rows = list(predictions)
    if rows:
        # One INSERT, without the ORM's unit of work: nothing here reads the rows back.
        session.execute(insert(Prediction.__table__), rows)
    session.commit()
    return True


def fail(session: Session, token: Claim | str, code: str, message: str) -> bool:
    """QUEUED/RUNNING -> FAILED with a reason users can read. A Claim must still be current. Commits."""
    claim_token = token if isinstance(token, Claim) else None
    study_id = token.study_id if isinstance(token, Claim) else token
    moved = transition(session, study_id, PENDING, StudyStatus.FAILED, token=claim_token,
                       error_code=code, error_message=message[:2000])
    session.commit()
    return moved is not None


def requeue(session: Session, study_id: str, *, token: Claim | None = None) -> bool:
    """RUNNING -> QUEUED (the sweeper finding a lost job); a token, if given, must be current. Commits."""
    moved = transition(session, study_id, StudyStatus.RUNNING, StudyStatus.QUEUED, token=token)
    session.commit()
    return moved is not None


def heartbeat(session: Session, tokens: Iterable[Claim], waiting: Iterable[str] = ()) -> set[str]:
    """Renew heartbeat_at of the RUNNING studies these claims still hold, and of the QUEUED
    studies in `waiting` (delivered to this worker, not claimed yet); returns the ids renewed. Commits.

    Not a move (the status stays): a stale token renews nothing, so a worker
    the sweeper took for lost cannot keep alive a study another worker has
    claimed since.
    """
    tokens, waiting = list(tokens), sorted(set(waiting))
    held = []
    if tokens:
        held.append(and_(Study.status == StudyStatus.RUNNING.value,
                         or_(*(and_(Study.id == t.study_id, Study.attempts == t.token)
                               for t in tokens))))
    if waiting:
        held.append(and_(Study.status == StudyStatus.QUEUED.value, Study.id.in_(waiting)))
    if not held:
        return set()
    renewed = session.execute(
        update(Study)
        .where(or_(*held))
        .values(heartbeat_at=utcnow())
        .returning(Study.id)
        .execution_options(synchronize_session=False)
    ).scalars().all()
    session.commit()
    return set(renewed)


def stale_studies(session: Session, older_than_s: float, lease_s: float | None = None,
                  limit: int = 500) -> list[Claim]:
    """Pending studies to re-enqueue, each with its attempt count to guard the requeue; reads only.

    RUNNING: no heartbeat for `lease_s` (its worker died). QUEUED: delivered
    to a worker (a heartbeat since it was queued) that stopped beating for
    `lease_s` before claiming it (it died waiting to run it alone). Either,
    whatever the heartbeat says: pending longer than `older_than_s` (a lost
    message, or a worker stuck).
    """
    now = utcnow()
    deadline = now - timedelta(seconds=older_than_s)
    lease_deadline = now - timedelta(seconds=lease_s) if lease_s is not None else deadline
    rows = session.execute(
        select(Study.id, Study.status, Study.attempts, Study.queued_at, Study.started_at,
               Study.heartbeat_at)
        .where(Study.status.in_([s.value for s in PENDING]))
        .order_by(Study.created_at)
        .limit(limit)
    ).all()
    stale = []
    for study_id, status, attempts, queued_at, started_at, heartbeat_at in rows:
        if status == StudyStatus.RUNNING:
            started = as_utc(started_at)
            alive = as_utc(heartbeat_at) or started
            lost = started is None or started < deadline or alive < lease_deadline
        else:
            queued, beat = as_utc(queued_at), as_utc(heartbeat_at)
            in_hand = queued is not None and beat is not None and beat >= queued
            lost = queued is None or queued < deadline or (in_hand and beat < lease_deadline)
        if lost:
            stale.append(Claim(study_id, attempts))
    return stale


def unclaimed_studies(session: Session, older_than_s: float, limit: int = 500) -> list[Claim]:
    """QUEUED studies waiting longer than `older_than_s` that no worker holds (no heartbeat since
    they were queued): each should have a message waiting in the broker's queue. Reads only."""
    deadline = utcnow() - timedelta(seconds=older_than_s)
    rows = session.execute(
        select(Study.id, Study.attempts, Study.queued_at, Study.heartbeat_at)
        .where(Study.status == StudyStatus.QUEUED.value, Study.queued_at < deadline)
        .order_by(Study.created_at)
        .limit(limit)
    ).all()
    return [Claim(study_id, attempts) for study_id, attempts, queued_at, heartbeat_at in rows
            if heartbeat_at is None or as_utc(heartbeat_at) < as_utc(queued_at)]


def touch_queued(session: Session, study_id: str) -> bool:
    """Restart a QUEUED study's deadline after re-sending its message (QUEUED -> QUEUED). Commits.

    False if the study is no longer QUEUED (claimed or finished meanwhile): send nothing then.
    """
    moved = transition(session, study_id, StudyStatus.QUEUED, StudyStatus.QUEUED)
    session.commit()
    return moved is not None
