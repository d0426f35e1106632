"""Heatmap overlays, drawn where they are looked at: the worker stores each image's Grad-CAM map
(Prediction.heatmap_cam); the first request for the overlay draws it over the image and keeps
the PNG in Prediction.heatmap_png, so it is drawn once. Drawing costs more CPU than anything
else a study needs besides the model (docs/benchmarks.md, drain), so it is kept off the
workers, which are the tier that must keep up with arrivals."""

from __future__ import annotations

import logging

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ml.imaging import ImageError, Limits, decode_image
from ml.overlay import decode_cam, overlay_png
from webapp.models import Image, Prediction

log = logging.getLogger(__name__)


def overlay_for(session: Session, image_id: int) -> bytes | None:
    """The image's overlay PNG: kept, or drawn now and kept; None when there is none to draw
    (no prediction yet, the gate abstained, heatmaps off, or a prediction from before maps were stored)."""
    row = session.execute(
        select(
            Prediction.id, Prediction.abstain_reason, Prediction.heatmap_png, Prediction.heatmap_cam
        ).where(Prediction.image_id == image_id)
    ).one_or_none()
    if row is None or row.abstain_reason is not None:
        return None
    if row.heatmap_png is not None or row.heatmap_cam is None:
        return row.heatmap_png
    data = session.execute(select(Image.data).where(Image.id == image_id)).scalar_one()
    try:
        limits = Limits(max_bytes=len(data) + 1, max_pixels=current_app.config["MAX_IMAGE_PIXELS"])
        pixels = decode_image(data, limits).pixels
        png = overlay_png(pixels, decode_cam(row.heatmap_cam))
    except (ImageError, ValueError) as exc:  # the worker decoded this image; a stored map went bad
        log.warning("event=heatmap_unrenderable image=%s error=%s", image_id, exc)
        return None
    # Two requests may draw it at once: the same bytes, and only the first is written.
    session.execute(
        update(Prediction)
        .where(Prediction.id == row.id, Prediction.heatmap_png.is_(None))
        .values(heatmap_png=png)
    )
    session.commit()
    log.info("event=heatmap_drawn image=%s bytes=%d", image_id, len(png))
    return png
