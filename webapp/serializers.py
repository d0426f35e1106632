"""JSON shapes of studies, shared by the API and the polling page."""

from __future__ import annotations

from typing import Any

from flask import url_for

from ml.gate import REASONS
from webapp.jobs import FINISHED, StudyStatus
from webapp.models import Image, Study, as_utc

NOTICE = "Research use only. Not for diagnosis."


def _time(value: Any) -> str | None:
    value = as_utc(value)
    return value.isoformat() if value else None


def abstain_message(reason: str | None) -> str | None:
    """Why no COVID-19 result is given for an image, in plain words (None when one is)."""
    if reason is None:
        return None
    why = REASONS.get(reason, "the image is not one the model can read")
    return (f"No COVID-19 result: {why}. The model reads frontal (PA or AP) chest X-rays "
            "only; upload one to get a result.")


def image_json(study: Study, image: Image) -> dict[str, Any]:
    """One image, with its result once there is one."""
    urls = {
        "original_url": url_for("media.original", study_id=study.id, image_id=image.id),
        "preview_url": url_for("media.preview", study_id=study.id, image_id=image.id),
    }
    result = None
    if image.prediction is not None:
        p = image.prediction
        abstained = p.abstain_reason is not None
        result = {
            # An abstention gives no reading: the probability stays in the database for audit.
            "probability_covid": None if abstained else round(p.probability_covid, 6),
            "label": p.label,
            "abstain_reason": p.abstain_reason,
            "abstain_message": abstain_message(p.abstain_reason),
            "gate_version": p.gate_version,
            "threshold": p.threshold,
            "model_version": p.model_version,
            "model_card_url": url_for("about.model_page", version=p.model_version),
            "model_sha256": p.model_sha256,
            "model_trained": p.model_trained,
            "preprocess_version": p.preprocess_version,
            "inference_ms": round(p.inference_ms, 2),
            "backend": p.backend,
            "heatmap_url": None if abstained
            else url_for("media.heatmap", study_id=study.id, image_id=image.id),
        }
    return {
        "id": image.id,
        "position": image.position,
        "filename": image.filename,
        "media_type": image.media_type,
        "size_bytes": image.size_bytes,
        "sha256": image.sha256,
        "width": image.width,
        "height": image.height,
        "bit_depth": image.bit_depth,
        "attributes": image.attributes or {},
        **urls,
        "result": result,
    }


def study_summary(study: Study) -> dict[str, Any]:
    """The fields a list needs (no images)."""
    body: dict[str, Any] = {
        "id": study.id,
        "status": study.status,
        "patient_ref": study.patient_ref,
        "accession": study.accession,
        "created_at": _time(study.created_at),
        "queued_at": _time(study.queued_at),
        "started_at": _time(study.started_at),
        "finished_at": _time(study.finished_at),
        "attempts": study.attempts,
        "pcr_result": study.pcr_result,
        "done": StudyStatus(study.status) in FINISHED,
        "url": url_for("api.get_study", study_id=study.id),
        "page_url": url_for("clinician.study", study_id=study.id),
    }
    if study.status == StudyStatus.FAILED:
        body["error"] = {"code": study.error_code, "message": study.error_message}
    return body


def study_json(study: Study) -> dict[str, Any]:
    """A study with its images and results, and the research-use notice."""
    body = study_summary(study)
    body["images"] = [image_json(study, image) for image in study.images]
    body["notice"] = NOTICE
    return body
