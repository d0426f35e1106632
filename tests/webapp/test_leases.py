"""Heartbeats and leases in the state machine, on SQLite and PostgreSQL: which RUNNING studies
the sweeper takes for lost, and why a presumed-dead worker's late writes change nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from webapp import jobs
from webapp.extensions import db
from webapp.jobs import Claim, StudyStatus
from webapp.models import Study, as_utc, utcnow

LEASE_S = 30
STALE_AFTER_S = 600


@pytest.fixture
def tiny_model_dir(tmp_path):
    """These tests never run a model."""
    return tmp_path / "no-model"


def new_study() -> str:
    study = Study()
    jobs.start_queued(study)
    db.session.add(study)
    db.session.commit()
    return study.id


def age(study_id: str, **seconds_ago: float) -> None:
    """Move the study's timestamps (queued_at=..., started_at=..., heartbeat_at=...) into the past."""
    now = utcnow()
    db.session.execute(update(Study).where(Study.id == study_id).values(
        {column: now - timedelta(seconds=s) for column, s in seconds_ago.items()}))
    db.session.commit()


def heartbeat_at(study_id: str):
    value = db.session.get(Study, study_id, populate_existing=True).heartbeat_at
    db.session.commit()
    return as_utc(value)


def stale_ids() -> list[str]:
    return [c.study_id for c in jobs.stale_studies(db.session, STALE_AFTER_S, LEASE_S)]


def test_heartbeat_renews_only_claims_still_held(app):
    with app.app_context():
        kept, taken_over, queued = new_study(), new_study(), new_study()
        mine = jobs.claim(db.session, kept, max_attempts=3)
        lost = jobs.claim(db.session, taken_over, max_attempts=3)
        jobs.claim(db.session, taken_over, max_attempts=3)  # redelivered to another worker
        for study_id in (kept, taken_over):
            age(study_id, heartbeat_at=20)
        before = heartbeat_at(taken_over)
        renewed = jobs.heartbeat(db.session, [mine, lost, Claim(queued, 0), Claim("no-such", 1)])
        assert renewed == {kept}
        assert heartbeat_at(kept) > utcnow() - timedelta(seconds=5)
        assert heartbeat_at(taken_over) == before  # a stale token keeps nothing alive
        assert heartbeat_at(queued) is None
        assert jobs.heartbeat(db.session, []) == set()


def test_heartbeat_does_not_revive_a_requeued_or_finished_study(app):
    with app.app_context():
        requeued, finished = new_study(), new_study()
        a = jobs.claim(db.session, requeued, max_attempts=3)
        b = jobs.claim(db.session, finished, max_attempts=3)
        assert jobs.requeue(db.session, requeued, token=a)
        assert jobs.finish(db.session, b, [])
        assert jobs.heartbeat(db.session, [a, b]) == set()
        assert db.session.get(Study, requeued).status == StudyStatus.QUEUED


def test_stale_studies_running_by_heartbeat_queued_by_wait(app):
    with app.app_context():
        beating = new_study()
        silent = new_study()
        never_beat = new_study()  # a row from before heartbeats: its start time counts
        beating_too_long = new_study()
        queued_recently = new_study()
        queued_long = new_study()
        for study_id in (beating, silent, never_beat, beating_too_long):
            jobs.claim(db.session, study_id, max_attempts=3)
        age(silent, started_at=40, heartbeat_at=LEASE_S + 1)
        db.session.execute(update(Study).where(Study.id == never_beat).values(heartbeat_at=None))
        age(never_beat, started_at=LEASE_S + 1)
        age(beating_too_long, started_at=STALE_AFTER_S + 1, heartbeat_at=1)
        age(queued_recently, queued_at=LEASE_S * 3)  # waiting in a backlog is not a lost worker
        age(queued_long, queued_at=STALE_AFTER_S + 1)
        assert sorted(stale_ids()) == sorted([silent, never_beat, beating_too_long, queued_long])
        # Each comes with the attempt count the sweep saw, to guard its requeue.
        tokens = {c.study_id: c.token for c in jobs.stale_studies(db.session, STALE_AFTER_S, LEASE_S)}
        assert tokens[silent] == 1 and tokens[queued_long] == 0
        # Without a lease, RUNNING studies wait for STALE_AFTER_S as before.
        legacy = [c.study_id for c in jobs.stale_studies(db.session, STALE_AFTER_S)]
        assert sorted(legacy) == sorted([beating_too_long, queued_long])


def test_a_presumed_dead_workers_late_writes_change_nothing(app):
    with app.app_context():
        study_id = new_study()
        presumed_dead = jobs.claim(db.session, study_id, max_attempts=3)
        age(study_id, heartbeat_at=LEASE_S + 1)
        [seen] = jobs.stale_studies(db.session, STALE_AFTER_S, LEASE_S)
        assert jobs.requeue(db.session, study_id, token=seen)  # the sweeper
        # Alive after all, it finishes before anyone else claimed: the study is QUEUED, not its to finish.
        assert jobs.finish(db.session, presumed_dead, []) is False
        successor = jobs.claim(db.session, study_id, max_attempts=3)
        assert successor.token == presumed_dead.token + 1
        assert jobs.heartbeat(db.session, [presumed_dead]) == set()
        assert jobs.finish(db.session, presumed_dead, []) is False
        assert jobs.fail(db.session, presumed_dead, "timeout", "late") is False
        assert jobs.finish(db.session, successor, []) is True
        study = db.session.get(Study, study_id)
        assert study.status == StudyStatus.SUCCEEDED and study.attempts == 2


def test_a_requeue_guarded_by_the_sweeps_token_spares_a_fresh_claim(app):
    with app.app_context():
        study_id = new_study()
        jobs.claim(db.session, study_id, max_attempts=3)
        age(study_id, heartbeat_at=LEASE_S + 1)
        [seen] = jobs.stale_studies(db.session, STALE_AFTER_S, LEASE_S)
        fresh = jobs.claim(db.session, study_id, max_attempts=3)  # redelivered meanwhile
        assert jobs.requeue(db.session, study_id, token=seen) is False
        assert jobs.touch_queued(db.session, study_id) is False
        assert jobs.finish(db.session, fresh, []) is True


def test_heartbeat_of_delivered_studies_renews_queued_ones_only(app):
    with app.app_context():
        waiting, running = new_study(), new_study()
        jobs.claim(db.session, running, max_attempts=3)
        age(running, heartbeat_at=20)
        before = heartbeat_at(running)
        assert jobs.heartbeat(db.session, [], [waiting, running]) == {waiting}
        assert heartbeat_at(running) == before  # a claim beats by its token, never by its id
        assert heartbeat_at(waiting) > utcnow() - timedelta(seconds=5)


def test_stale_studies_queued_in_a_workers_hand_by_heartbeat(app):
    with app.app_context():
        held_alive, held_dead, requeued = new_study(), new_study(), new_study()
        for study_id in (held_alive, held_dead):
            age(study_id, queued_at=LEASE_S * 3)
            jobs.heartbeat(db.session, [], [study_id])  # delivered, waiting to run alone
        age(held_dead, heartbeat_at=LEASE_S + 1)
        # Requeued after its worker died: the old heartbeat predates the new queued_at.
        token = jobs.claim(db.session, requeued, max_attempts=3)
        age(requeued, heartbeat_at=LEASE_S + 1)
        assert jobs.requeue(db.session, requeued, token=token)
        assert stale_ids() == [held_dead]
        # Re-sent: its deadline restarts and the worker that held it counts no more.
        assert jobs.touch_queued(db.session, held_dead)
        assert stale_ids() == []


def test_a_redelivered_message_leaves_a_study_whose_worker_beats_to_it(app):
    with app.app_context():
        study_id = new_study()
        alive = jobs.claim(db.session, study_id, max_attempts=3, lease_s=LEASE_S)
        # The broker re-offered the message (visibility timeout) while the worker still beats.
        assert jobs.claim(db.session, study_id, max_attempts=3, lease_s=LEASE_S) is None
        study = db.session.get(Study, study_id, populate_existing=True)
        assert study.status == StudyStatus.RUNNING and study.attempts == 1
        assert jobs.heartbeat(db.session, [alive]) == {study_id}
        # Once the beats stop for LEASE_S, the next delivery takes over with a new token.
        age(study_id, heartbeat_at=LEASE_S + 1)
        taken_over = jobs.claim(db.session, study_id, max_attempts=3, lease_s=LEASE_S)
        assert taken_over.token == 2
        assert jobs.finish(db.session, alive, []) is False
        # A row from before heartbeats (none recorded) counts as lost.
        db.session.execute(update(Study).where(Study.id == study_id).values(heartbeat_at=None))
        db.session.commit()
        assert jobs.claim(db.session, study_id, max_attempts=3, lease_s=LEASE_S).token == 3


def test_first_claim_takes_only_a_study_never_claimed(app):
    """The worker's one-statement path: a new study is claimed at once; a study claimed before
    (even one whose worker is lost) is left to the path that looks at it first."""
    with app.app_context():
        fresh, lost = new_study(), new_study()
        assert jobs.claim(db.session, fresh, max_attempts=3, lease_s=LEASE_S, first=True) == \
            Claim(fresh, 1)
        assert jobs.claim(db.session, fresh, max_attempts=3, lease_s=LEASE_S, first=True) is None
        assert jobs.claim(db.session, lost, max_attempts=3, lease_s=LEASE_S) == Claim(lost, 1)
        age(lost, heartbeat_at=LEASE_S + 1)
        assert jobs.claim(db.session, lost, max_attempts=3, lease_s=LEASE_S, first=True) is None
        assert db.session.get(Study, lost, populate_existing=True).attempts == 1
        assert jobs.claim(db.session, lost, max_attempts=3, lease_s=LEASE_S) == Claim(lost, 2)
