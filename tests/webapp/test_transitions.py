"""The study state machine: every edge of jobs.TRANSITIONS, allowed and forbidden, on SQLite and PostgreSQL.

The real functions (claim, finish, fail, requeue, touch_queued) are run from
every status; a spy around jobs.transition records the moves they make.
Together with the table check below this shows that the table lists exactly
the moves the code makes: no edge nobody uses, no move the table misses.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select

from webapp import jobs
from webapp.extensions import db
from webapp.jobs import TRANSITIONS, Claim, StudyStatus, TransitionError
from webapp.models import Study, as_utc, utcnow

Q, R, S, F = StudyStatus.QUEUED, StudyStatus.RUNNING, StudyStatus.SUCCEEDED, StudyStatus.FAILED
STATES = list(StudyStatus)
EDGES = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
FORBIDDEN = {(old, new) for old in STATES for new in STATES} - EDGES
AN_HOUR = timedelta(hours=1)
COLUMNS = (Study.status, Study.attempts, Study.queued_at, Study.started_at, Study.finished_at,
           Study.heartbeat_at, Study.error_code, Study.error_message)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """These tests never run a model: the app fixture gets an empty model directory."""
    return tmp_path / "no-model"


def new_study(status: StudyStatus) -> str:
    """A study in `status` whose timestamps are an hour old, so every change to them shows."""
    then = utcnow() - AN_HOUR
    study = Study(
        status=status.value, queued_at=then,
        started_at=None if status is Q else then,
        heartbeat_at=None if status is Q else then,
        finished_at=then if status in jobs.FINISHED else None,
        attempts=0 if status is Q else 1,
        error_code="old_error" if status is F else None,
        error_message="old reason" if status is F else None,
    )
    db.session.add(study)
    db.session.commit()
    return study.id


def row(study_id: str) -> dict[str, Any]:
    """The study's state columns as stored now (never the session's cached copy)."""
    values = db.session.execute(select(*COLUMNS).where(Study.id == study_id)).one()
    db.session.commit()
    return {c.key: as_utc(v) if isinstance(v, datetime) else v for c, v in zip(COLUMNS, values, strict=True)}


def assert_entered(before: dict[str, Any], after: dict[str, Any], target: StudyStatus) -> None:
    """The columns a move into `target` must set."""
    fresh = utcnow() - timedelta(minutes=5)
    assert after["status"] == target
    if target is Q:
        assert after["queued_at"] > fresh
    if target is R:
        assert after["started_at"] > fresh and after["attempts"] > before["attempts"]
        assert after["heartbeat_at"] > fresh  # a new claim starts its lease
    if target in jobs.FINISHED:
        assert after["finished_at"] > fresh
    if target is S:
        assert after["error_code"] is None and after["error_message"] is None


def current(study_id: str) -> Claim:
    return Claim(study_id, row(study_id)["attempts"])


def stale(study_id: str) -> Claim:
    return Claim(study_id, row(study_id)["attempts"] - 1)


# Each real function, called the ways its callers call it.
CALLS: dict[str, Callable[[str], Any]] = {
    "claim": lambda sid: jobs.claim(db.session, sid, max_attempts=5),
    "claim past max_attempts": lambda sid: jobs.claim(db.session, sid, max_attempts=0),
    # new_study's heartbeat is an hour old: a RUNNING study's lease has run out.
    "claim, lease expired": lambda sid: jobs.claim(db.session, sid, max_attempts=5, lease_s=60),
    "finish": lambda sid: jobs.finish(db.session, current(sid), []),
    "finish, stale token": lambda sid: jobs.finish(db.session, stale(sid), []),
    "fail by id": lambda sid: jobs.fail(db.session, sid, "bad_input", "unreadable"),
    "fail, current token": lambda sid: jobs.fail(db.session, current(sid), "timeout", "too slow"),
    "fail, stale token": lambda sid: jobs.fail(db.session, stale(sid), "timeout", "too slow"),
    "requeue": lambda sid: jobs.requeue(db.session, sid),
    "requeue, current token": lambda sid: jobs.requeue(db.session, sid, token=current(sid)),
    "requeue, stale token": lambda sid: jobs.requeue(db.session, sid, token=stale(sid)),
    "touch_queued": lambda sid: jobs.touch_queued(db.session, sid),
}
# The moves each call makes from each start status, in order; a status not listed: refused, nothing changes.
MOVES: dict[str, dict[StudyStatus, list[tuple[StudyStatus, StudyStatus]]]] = {
    "claim": {Q: [(Q, R)], R: [(R, R)]},  # R -> R: redelivery after a lost worker
    "claim past max_attempts": {Q: [(Q, R), (R, F)], R: [(R, R), (R, F)]},
    "claim, lease expired": {Q: [(Q, R)], R: [(R, R)]},
    "finish": {R: [(R, S)]},
    "finish, stale token": {},
    "fail by id": {Q: [(Q, F)], R: [(R, F)]},
    "fail, current token": {Q: [(Q, F)], R: [(R, F)]},
    "fail, stale token": {},
    "requeue": {R: [(R, Q)]},
    "requeue, current token": {R: [(R, Q)]},
    "requeue, stale token": {},
    "touch_queued": {Q: [(Q, Q)]},  # the sweeper re-sent the message: restart the deadline
}


def expected_return(name: str, start: StudyStatus) -> Any:
    moved = start in MOVES[name]
    if name in ("claim", "claim, lease expired"):
        return "claim" if moved else None
    if name == "claim past max_attempts":
        return None  # claimed, then failed at once
    return moved


@pytest.fixture
def made(monkeypatch) -> list[tuple[StudyStatus, StudyStatus]]:
    """Every move jobs.transition actually made (status before, status after), in order."""
    moves: list[tuple[StudyStatus, StudyStatus]] = []
    real = jobs.transition

    def spy(session, study_id, sources, target, **kwargs):
        before = session.execute(select(Study.status).where(Study.id == study_id)).scalar_one()
        moved = real(session, study_id, sources, target, **kwargs)
        if moved is not None:
            moves.append((StudyStatus(before), target))
        return moved

    monkeypatch.setattr(jobs, "transition", spy)
    return moves


def test_the_table_is_exactly_the_moves_the_functions_make():
    used = {move for by_start in MOVES.values() for moves in by_start.values() for move in moves}
    assert used - EDGES == set(), "moves the functions make that TRANSITIONS does not list"
    assert EDGES - used == set(), "edges in TRANSITIONS that no function uses"
    assert set(CALLS) == set(MOVES)
    assert not TRANSITIONS[S] and not TRANSITIONS[F]  # finished is final


@pytest.mark.parametrize("name", list(CALLS))
def test_each_function_makes_only_its_moves_from_every_status(app, made, name):
    with app.app_context():
        for start in STATES:
            study_id = new_study(start)
            before = row(study_id)
            made.clear()
            result = CALLS[name](study_id)
            after = row(study_id)
            expected = MOVES[name].get(start, [])
            assert made == expected, f"{name} from {start}"
            if expected:
                assert_entered(before, after, expected[-1][1])
            else:
                assert after == before, f"{name} from {start} changed a refused study"
            want = expected_return(name, start)
            if want == "claim":
                assert result == Claim(study_id, after["attempts"])
            else:
                assert result is want, f"{name} from {start} returned {result!r}"


def test_transition_makes_every_allowed_move(app):
    with app.app_context():
        for old, new in sorted(EDGES):
            study_id = new_study(old)
            before = row(study_id)
            attempts = jobs.transition(db.session, study_id, old, new)
            db.session.commit()
            after = row(study_id)
            assert attempts is not None and attempts == after["attempts"], f"{old} -> {new}"
            assert_entered(before, after, new)


def test_transition_guards_the_actual_status_and_the_token(app):
    with app.app_context():
        for old, new in sorted(EDGES):
            # Allowed by the table, but the study is elsewhere: the compare-and-set refuses.
            for actual in STATES:
                if actual == old:
                    continue
                study_id = new_study(actual)
                before = row(study_id)
                assert jobs.transition(db.session, study_id, old, new) is None
                db.session.commit()
                assert row(study_id) == before
            # In the right status, but holding a stale token.
            study_id = new_study(old)
            before = row(study_id)
            assert jobs.transition(db.session, study_id, old, new, token=stale(study_id)) is None
            db.session.commit()
            assert row(study_id) == before
        assert jobs.transition(db.session, "no-such-study", Q, R) is None


@pytest.fixture
def statements(app):
    """The SQL statements the app's engine runs (cleared by the test when it starts counting)."""
    seen: list[str] = []

    def record(conn, cursor, statement, *args):
        seen.append(statement)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def test_transition_refuses_every_forbidden_move_before_any_sql(app, statements):
    with app.app_context():
        assert FORBIDDEN, "a state machine where everything is allowed"
        for old, new in sorted(FORBIDDEN):
            study_id = new_study(old)
            before = row(study_id)
            statements.clear()
            with pytest.raises(TransitionError, match=f"{old.value} -> {new.value}"):
                jobs.transition(db.session, study_id, old, new)
            assert statements == [], f"{old} -> {new} ran SQL before it was refused"
            db.session.rollback()
            assert row(study_id) == before
        # One forbidden source spoils the whole move, even if another source is allowed.
        study_id = new_study(Q)
        statements.clear()
        with pytest.raises(TransitionError):
            jobs.transition(db.session, study_id, {Q, S}, R)
        with pytest.raises(ValueError):
            jobs.transition(db.session, study_id, [], R)
        assert statements == []


def test_redelivery_claim_makes_the_old_token_stale(app):
    with app.app_context():
        study_id = new_study(Q)
        lost = jobs.claim(db.session, study_id, max_attempts=3)
        taken_over = jobs.claim(db.session, study_id, max_attempts=3)
        assert (lost.token, taken_over.token) == (1, 2)
        assert jobs.finish(db.session, lost, []) is False
        assert jobs.fail(db.session, lost, "x", "y") is False
        assert jobs.requeue(db.session, study_id, token=lost) is False
        assert jobs.finish(db.session, taken_over, []) is True
        assert row(study_id)["status"] == S


def test_claim_past_max_attempts_fails_with_a_reason(app):
    with app.app_context():
        study_id = new_study(Q)
        assert jobs.claim(db.session, study_id, max_attempts=1) is not None
        assert jobs.claim(db.session, study_id, max_attempts=1) is None
        after = row(study_id)
        assert after["status"] == F and after["error_code"] == "too_many_attempts"
        assert after["error_message"] == "processing was interrupted 1 times; giving up"
