"""The worker's heartbeats and the sweeper's use of them, on a real database with the tiny model."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import func, select, update

from tests.conftest import png_bytes
from tests.worker.test_pipeline import prediction_count, upload
from webapp import jobs
from webapp.extensions import db
from webapp.jobs import StudyStatus
from webapp.models import Image, Prediction, Study, as_utc, utcnow
from worker import pipeline
from worker.leases import Leases


def silence(study_id: str, seconds: float) -> None:
    """Make the study's last heartbeat `seconds` old, as if its worker had died then."""
    db.session.execute(update(Study).where(Study.id == study_id)
                       .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))
    db.session.commit()


def test_the_heartbeat_thread_renews_held_claims_until_released(app, client):
    study_id = upload(client, ("a.png", png_bytes()))
    app.config["HEARTBEAT_S"] = 0.2
    leases = Leases()
    with app.app_context():
        token = jobs.claim(db.session, study_id, max_attempts=3)
        silence(study_id, 60)
        with leases.hold(token):
            assert leases.held() == [token]
            deadline = time.monotonic() + 10
            while as_utc(db.session.get(Study, study_id, populate_existing=True).heartbeat_at) \
                    < utcnow() - timedelta(seconds=5):
                db.session.commit()
                assert time.monotonic() < deadline, "no heartbeat within 10 s"
                time.sleep(0.05)
        assert leases.held() == []
        silence(study_id, 60)
        time.sleep(0.6)  # released: nothing renews it any more
        stale = jobs.stale_studies(db.session, 600, lease_s=30)
        assert [c.study_id for c in stale] == [study_id]


def test_a_lost_lease_is_logged_and_not_renewed(app, client, caplog):
    study_id = upload(client, ("a.png", png_bytes()))
    leases = Leases()
    with app.app_context():
        token = jobs.claim(db.session, study_id, max_attempts=3)
        with leases.hold(token):
            assert leases.beat() == {study_id}
            jobs.claim(db.session, study_id, max_attempts=3)  # another worker took over
            with caplog.at_level(logging.WARNING, logger="worker.leases"):
                assert leases.beat() == set()
    assert f"event=lease_lost study={study_id} token=1" in caplog.text


def test_sweeper_requeues_a_silent_running_study_and_spares_a_beating_one(app, client):
    silent = upload(client, ("a.png", png_bytes()))
    beating = upload(client, ("b.png", png_bytes()))
    with app.app_context():
        jobs.claim(db.session, silent, max_attempts=3)
        jobs.claim(db.session, beating, max_attempts=3)
        silence(silent, app.config["LEASE_S"] + 1)
        silence(beating, app.config["LEASE_S"] - 5)
        sent: list[str] = []
        assert pipeline.requeue_stale(send=sent.append) == 1
        assert sent == [silent]
        assert db.session.get(Study, silent).status == StudyStatus.QUEUED
        assert db.session.get(Study, beating).status == StudyStatus.RUNNING


def test_sweeper_sends_nothing_for_a_study_claimed_since_it_looked(app, client, monkeypatch):
    study_id = upload(client, ("a.png", png_bytes()))
    with app.app_context():
        jobs.claim(db.session, study_id, max_attempts=3)
        silence(study_id, app.config["LEASE_S"] + 1)
        seen = jobs.stale_studies(db.session, app.config["STALE_AFTER_S"], app.config["LEASE_S"])
        jobs.claim(db.session, study_id, max_attempts=3)  # a redelivery won the race
        monkeypatch.setattr(jobs, "stale_studies", lambda *a, **k: seen)
        sent: list[str] = []
        assert pipeline.requeue_stale(send=sent.append) == 0
        assert sent == []
        assert db.session.get(Study, study_id).status == StudyStatus.RUNNING


def test_study_of_a_presumed_dead_worker_is_rerun_once_and_its_late_result_discarded(app, client):
    study_id = upload(client, ("a.png", png_bytes()), ("b.png", png_bytes()))
    with app.app_context():
        presumed_dead = jobs.claim(db.session, study_id, max_attempts=3)
        silence(study_id, app.config["LEASE_S"] + 1)
        sent: list[str] = []
        assert pipeline.requeue_stale(send=sent.append) == 1 and sent == [study_id]
        assert pipeline.run_study(study_id) == "succeeded"  # the re-sent message
        # The old worker was only slow: its result arrives now and is discarded.
        images = db.session.scalars(select(Image).where(Image.study_id == study_id)).all()
        late = [dict(image_id=i.id, probability_covid=0.9, label="covid", threshold=0.5,
                     model_version="late", model_sha256="0" * 64, model_trained=False,
                     preprocess_version="1", inference_ms=1.0) for i in images]
        assert jobs.finish(db.session, presumed_dead, late) is False
        assert prediction_count(study_id) == 2  # one per image
        assert db.session.scalar(select(func.count()).select_from(Prediction)
                                 .where(Prediction.model_version == "late")) == 0
        study = db.session.get(Study, study_id)
        assert study.status == StudyStatus.SUCCEEDED and study.attempts == 2


def test_a_study_waiting_its_turn_beats_from_delivery_until_claimed(app, client):
    study_id = upload(client, ("a.png", png_bytes()))
    leases = Leases()
    with app.app_context():
        assert db.session.get(Study, study_id).heartbeat_at is None
        with leases.waiting(study_id, mark_now=True):
            db.session.commit()
            assert as_utc(db.session.get(Study, study_id, populate_existing=True).heartbeat_at) \
                > utcnow() - timedelta(seconds=5)
            assert leases.beat() == {study_id}
            token = jobs.claim(db.session, study_id, max_attempts=3)
            with leases.hold(token):
                assert leases.beat() == {study_id}  # by its token now
            silence(study_id, 60)
            assert leases.beat() == set()  # nothing left in hand
        db.session.remove()


def test_isolation_says_when_a_study_would_wait():
    from worker.isolation import Isolation

    isolation = Isolation()
    assert not isolation.would_wait(True) and not isolation.would_wait(False)
    with isolation.hold(exclusive=False):
        assert isolation.would_wait(True) and not isolation.would_wait(False)
    with isolation.hold(exclusive=True):
        assert isolation.would_wait(True) and isolation.would_wait(False)


def queued_long_ago(study_id: str, seconds: float) -> None:
    db.session.execute(update(Study).where(Study.id == study_id)
                       .values(queued_at=utcnow() - timedelta(seconds=seconds)))
    db.session.commit()


def test_sweeper_resends_waiting_studies_when_the_queue_holds_fewer_messages(app, client):
    lease_s = app.config["LEASE_S"]
    waiting = [upload(client, (f"{i}.png", png_bytes())) for i in range(3)]
    fresh = upload(client, ("new.png", png_bytes()))
    in_hand = upload(client, ("held.png", png_bytes()))
    with app.app_context():
        for study_id in (*waiting, in_hand):
            queued_long_ago(study_id, lease_s + 1)
        jobs.heartbeat(db.session, [], [in_hand])  # a live worker holds it: not the queue's
        sent: list[str] = []
        # Three studies wait, three messages wait: nothing is missing.
        assert pipeline.requeue_stale(send=sent.append, queue_depth=lambda: 3) == 0
        # One message fewer (a worker died between taking one and recording it): all three go again.
        assert pipeline.requeue_stale(send=sent.append, queue_depth=lambda: 2) == 3
        assert sorted(sent) == sorted(waiting) and fresh not in sent
        # Their wait restarted: the next sweep finds nothing missing.
        assert pipeline.requeue_stale(send=sent.append, queue_depth=lambda: 0) == 0

        def broker_away() -> int:
            raise ConnectionError("broker away")

        for study_id in waiting:
            queued_long_ago(study_id, lease_s + 1)
        assert pipeline.requeue_stale(send=sent.append, queue_depth=broker_away) == 0
