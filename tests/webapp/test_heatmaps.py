"""Heatmaps are drawn on first request from the stored Grad-CAM map, kept, and served again."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from ml.imaging import decode_image
from ml.overlay import encode_cam, overlay_png
from tests.webapp.rows import TINY_PNG_SIZE, add_study
from webapp.extensions import db
from webapp.models import Image, Prediction

CAM = np.array([[0.0, 0.5], [0.25, 1.0]], np.float32)


def _with_cam(app, clinician_id: int, cam: bytes | None, **fields) -> tuple[str, int]:
    with app.app_context():
        study_id = add_study(clinician_id, heatmap=False, **fields)
        image = db.session.execute(select(Image).where(Image.study_id == study_id)).scalar_one()
        image.prediction.heatmap_cam = cam
        db.session.commit()
        return study_id, image.id


def _stored_png(app, image_id: int) -> bytes | None:
    with app.app_context():
        return db.session.execute(
            select(Prediction.heatmap_png).where(Prediction.image_id == image_id)
        ).scalar_one()


def test_first_request_draws_the_overlay_from_the_map_and_keeps_it(app, client, clinician_id) -> None:
    study_id, image_id = _with_cam(app, clinician_id, encode_cam(CAM))
    assert _stored_png(app, image_id) is None
    first = client.get(f"/studies/{study_id}/images/{image_id}/heatmap.png")
    assert first.status_code == 200 and first.mimetype == "image/png"
    with app.app_context():
        data = db.session.get(Image, image_id).data
    # Exactly what the worker would have drawn: the decoded upload under the stored map.
    assert first.data == overlay_png(decode_image(data).pixels, CAM)
    assert PILImage.open(io.BytesIO(first.data)).size == TINY_PNG_SIZE
    assert _stored_png(app, image_id) == first.data  # drawn once, kept
    with app.app_context():  # the second request serves what is kept, it does not draw again
        db.session.execute(db.update(Prediction).where(Prediction.image_id == image_id)
                           .values(heatmap_png=b"\x89PNG kept"))
        db.session.commit()
    assert client.get(f"/studies/{study_id}/images/{image_id}/heatmap.png").data == b"\x89PNG kept"


def test_no_map_abstention_or_a_damaged_map_is_a_404_not_a_500(app, client, clinician_id) -> None:
    none_id, none_image = _with_cam(app, clinician_id, None)  # heatmaps were off
    bad_id, bad_image = _with_cam(app, clinician_id, b"not a map")
    abstained_id, abstained_image = _with_cam(app, clinician_id, encode_cam(CAM),
                                              predictions=[(0.3, "indeterminate")])
    with app.app_context():
        db.session.execute(db.update(Prediction).where(Prediction.image_id == abstained_image)
                           .values(abstain_reason="not_frontal"))
        db.session.commit()
    for study_id, image_id in ((none_id, none_image), (bad_id, bad_image),
                               (abstained_id, abstained_image)):
        response = client.get(f"/studies/{study_id}/images/{image_id}/heatmap.png")
        assert response.status_code == 404, (study_id, response.status_code)
        assert _stored_png(app, image_id) is None
