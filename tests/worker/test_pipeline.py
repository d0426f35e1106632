"""The worker pipeline on a real database with a real (tiny, untrained) ResNet50."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from tests.conftest import png_bytes, real_xray_paths
from webapp import jobs
from webapp.extensions import db
from webapp.jobs import StudyStatus
from webapp.models import Image, Prediction, Study, utcnow
from webapp.pacs.models import DicomOrigin
from worker import pipeline


def upload(client, *files: tuple[str, bytes]) -> str:
    data = {"files": [(io.BytesIO(content), name) for name, content in files]}
    response = client.post("/api/v1/studies", data=data, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def lease_ran_out(study_id: str, lease_s: float) -> None:
    """Age the study's heartbeat past the lease, as if its worker had died then."""
    db.session.get(Study, study_id).heartbeat_at = utcnow() - timedelta(seconds=lease_s + 1)
    db.session.commit()


def prediction_count(study_id: str) -> int:
    return db.session.scalar(
        select(func.count()).select_from(Prediction).join(Image).where(Image.study_id == study_id)
    )


def test_study_succeeds_with_one_prediction_per_image(app, client):
    paths = real_xray_paths(2, "covid")
    study_id = upload(client, *[(p.name, p.read_bytes()) for p in paths])
    with app.app_context():
        assert pipeline.run_study(study_id) == "succeeded"
        assert pipeline.run_study(study_id) == "skipped"  # safe to run twice
        assert prediction_count(study_id) == 2
        stamps = db.session.scalars(select(Prediction.created_at).join(Image)
                                    .where(Image.study_id == study_id)).all()
        assert len(stamps) == 2 and all(stamps)  # the column's default, on a Core INSERT too
    body = client.get(f"/api/v1/studies/{study_id}").get_json()
    assert body["status"] == "succeeded" and body["attempts"] == 1
    for image in body["images"]:
        result = image["result"]
        assert 0.0 <= result["probability_covid"] <= 1.0
        expected = "covid" if result["probability_covid"] >= result["threshold"] else "non-covid"
        assert result["label"] == expected
        assert result["model_trained"] is False and "untrained" in result["model_version"]
        assert result["preprocess_version"] and result["inference_ms"] > 0
        heatmap = client.get(result["heatmap_url"])
        assert heatmap.status_code == 200 and heatmap.data.startswith(b"\x89PNG")
    for stamp in ("queued_at", "started_at", "finished_at"):
        assert body[stamp] is not None
    assert body["queued_at"] <= body["started_at"] <= body["finished_at"]


def test_no_model_installed_fails_with_that_reason(app, client, tmp_path):
    study_id = upload(client, ("a.png", png_bytes()))
    app.config["MODEL_DIR"] = str(tmp_path / "empty")
    with app.app_context():
        assert pipeline.run_study(study_id) == "failed"
    body = client.get(f"/api/v1/studies/{study_id}").get_json()
    assert body["status"] == "failed"
    assert body["error"] == {"code": "no_model", "message": "no model installed"}


def test_unreadable_stored_bytes_fail_the_study_not_the_worker(app, client):
    study_id = upload(client, ("fine.png", png_bytes()), ("later-corrupted.png", png_bytes()))
    with app.app_context():
        image = db.session.scalars(select(Image).where(Image.study_id == study_id, Image.position == 1)).one()
        image.data = b"\x89PNG\r\n\x1a\n garbage"
        image.prepared = None  # as if uploaded for another model: the worker decodes the bytes
        db.session.commit()
        assert pipeline.run_study(study_id) == "failed"
        assert prediction_count(study_id) == 0  # nothing half-written
    error = client.get(f"/api/v1/studies/{study_id}").get_json()["error"]
    assert error["code"] == "corrupt_image" and error["message"].startswith("later-corrupted.png:")


def test_a_pacs_study_without_images_fails_and_the_pacs_hook_still_runs(app, client):
    """With no image rows, whether the PACS sent the study cannot come with them: it is asked on
    its own, so the hook drops the identifiers kept for the reply (nothing will be sent)."""
    study_id = upload(client, ("a.png", png_bytes()))
    with app.app_context():
        db.session.add(DicomOrigin(study_id=study_id, via="dimse", calling_ae="MODALITY",
                                   identifiers={"PatientID": "12345"}))
        for image in db.session.scalars(select(Image).where(Image.study_id == study_id)):
            db.session.delete(image)
        db.session.commit()
        assert pipeline.run_study(study_id) == "failed"
        origin = db.session.get(DicomOrigin, study_id)
        assert origin.identifiers is None and origin.identifiers_deleted_at is not None
    error = client.get(f"/api/v1/studies/{study_id}").get_json()["error"]
    assert error == {"code": "no_images", "message": "the study has no images"}


def test_redelivery_after_a_lost_worker_takes_over(app, client):
    study_id = upload(client, ("a.png", png_bytes()))
    with app.app_context():
        lost = jobs.claim(db.session, study_id, max_attempts=3)  # a worker that then died
        assert lost is not None and lost.token == 1
        assert pipeline.run_study(study_id) == "skipped"  # redelivered while its lease runs
        lease_ran_out(study_id, app.config["LEASE_S"])
        assert pipeline.run_study(study_id) == "succeeded"  # the redelivered message
        # The dead worker's token is stale: it can neither finish nor fail the study.
        assert jobs.finish(db.session, lost, []) is False
        assert jobs.fail(db.session, lost, "x", "y") is False
        study = db.session.get(Study, study_id)
        assert study.status == StudyStatus.SUCCEEDED and study.attempts == 2
        assert prediction_count(study_id) == 1


def test_too_many_attempts_fails_the_study(app, client):
    study_id = upload(client, ("a.png", png_bytes()))
    with app.app_context():
        for _ in range(3):
            assert jobs.claim(db.session, study_id, max_attempts=3) is not None
        lease_ran_out(study_id, app.config["LEASE_S"])
        assert pipeline.run_study(study_id) == "skipped"
        study = db.session.get(Study, study_id)
        assert study.status == StudyStatus.FAILED and study.error_code == "too_many_attempts"


def test_sweeper_requeues_stale_studies_only(app, client):
    fresh = upload(client, ("a.png", png_bytes()))
    stuck_running = upload(client, ("b.png", png_bytes()))
    stuck_queued = upload(client, ("c.png", png_bytes()))
    done = upload(client, ("d.png", png_bytes()))
    with app.app_context():
        jobs.claim(db.session, stuck_running, max_attempts=3)
        long_ago = utcnow() - timedelta(hours=1)
        db.session.get(Study, stuck_running).started_at = long_ago
        db.session.get(Study, stuck_queued).queued_at = long_ago
        db.session.get(Study, done).queued_at = long_ago
        db.session.commit()
        assert pipeline.run_study(done) == "succeeded"
        sent: list[str] = []
        assert pipeline.requeue_stale(send=sent.append) == 2
        assert sorted(sent) == sorted([stuck_running, stuck_queued])
        assert db.session.get(Study, stuck_running).status == StudyStatus.QUEUED
        # Deadlines restart, so the next sweep does not resend them.
        assert pipeline.requeue_stale(send=sent.append) == 0
        assert fresh not in sent


@pytest.mark.parametrize("old,new,allowed", [
    (StudyStatus.QUEUED, StudyStatus.RUNNING, True),
    (StudyStatus.RUNNING, StudyStatus.SUCCEEDED, True),
    (StudyStatus.RUNNING, StudyStatus.QUEUED, True),
    (StudyStatus.SUCCEEDED, StudyStatus.RUNNING, False),
    (StudyStatus.FAILED, StudyStatus.QUEUED, False),
    (StudyStatus.QUEUED, StudyStatus.SUCCEEDED, False),
])
def test_transition_table(old, new, allowed):
    assert jobs.can_transition(old, new) is allowed


def test_finished_studies_cannot_be_reopened(app, client):
    study_id = upload(client, ("a.png", png_bytes()))
    with app.app_context():
        assert jobs.fail(db.session, study_id, "bad", "reason") is True
        assert jobs.claim(db.session, study_id, max_attempts=3) is None
        assert jobs.requeue(db.session, study_id) is False
        assert db.session.get(Study, study_id).status == StudyStatus.FAILED
