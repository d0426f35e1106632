"""Insert studies straight into the database, with chosen timestamps and results (tests only)."""

from __future__ import annotations

import io
from datetime import datetime, timedelta
from typing import Any

from PIL import Image as PILImage

from webapp.extensions import db
from webapp.models import Image, Prediction, Study, utcnow

TINY_PNG_SIZE = (64, 64)


def png(value: int = 128) -> bytes:
    buf = io.BytesIO()
    PILImage.new("L", TINY_PNG_SIZE, value).save(buf, format="PNG")
    return buf.getvalue()


def add_study(
    owner_id: int | None,
    *,
    status: str = "succeeded",
    created: datetime | None = None,
    queue_wait_s: float = 1.0,
    run_s: float = 2.0,
    predictions: list[tuple[float, str]] = ((0.8, "covid"),),
    model_version: str = "v-test",
    inference_ms: float = 120.0,
    error_code: str | None = None,
    pcr_result: str | None = None,
    patient_ref: str | None = None,
    heatmap: bool = True,
    **fields: Any,
) -> str:
    """One study with one image per prediction; SUCCEEDED studies get the predictions. Returns its id."""
    created = created or utcnow() - timedelta(minutes=5)
    started = created + timedelta(seconds=queue_wait_s)
    finished = started + timedelta(seconds=run_s) if status in ("succeeded", "failed") else None
    study = Study(
        owner_id=owner_id, status=status, created_at=created, queued_at=created,
        started_at=started if status != "queued" else None, finished_at=finished,
        attempts=0 if status == "queued" else 1, error_code=error_code,
        error_message="test failure" if error_code else None, pcr_result=pcr_result,
        patient_ref=patient_ref, **fields,
    )
    for position, (probability, label) in enumerate(predictions):
        data = png(100 + position)
        image = Image(
            position=position, filename=f"img-{position}.png", media_type="image/png",
            size_bytes=len(data), sha256="0" * 64, width=TINY_PNG_SIZE[0], height=TINY_PNG_SIZE[1],
            bit_depth=8, attributes={}, data=data,
        )
        if status == "succeeded":
            image.prediction = Prediction(
                probability_covid=probability, label=label, threshold=0.5,
                model_version=model_version, model_sha256="1" * 64, model_trained=True,
                preprocess_version="1", inference_ms=inference_ms, backend="onnx",
                heatmap_png=png(200) if heatmap else None, created_at=finished,
            )
        study.images.append(image)
    db.session.add(study)
    db.session.commit()
    return study.id
