"""Serve a study's images: the original upload, a browser preview, the heatmap."""

from __future__ import annotations

from flask import Blueprint, Response, abort

from ml.imaging import ImageError, Limits, decode_image, to_display_png
from webapp import audit
from webapp.extensions import db
from webapp.media.heatmaps import overlay_for
from webapp.studies import get_image_or_404

bp = Blueprint("media", __name__, url_prefix="/studies/<study_id>/images/<int:image_id>")

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "application/dicom": "dcm"}


def _private(response: Response) -> Response:
    # Medical images must not linger in shared caches.
    response.headers["Cache-Control"] = "private, max-age=300"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/original")
def original(study_id: str, image_id: int) -> Response:
    """The stored bytes as a download: the upload as sent, DICOM de-identified unless configured not to."""
    image = get_image_or_404(study_id, image_id)
    audit.record("image_downloaded", study_id=image.study_id, image_id=image.id)
    name = f"study-{study_id[:8]}-image-{image.position + 1}.{EXTENSIONS.get(image.media_type, 'bin')}"
    response = Response(image.data, mimetype=image.media_type)
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return _private(response)


@bp.get("/preview.png")
def preview(study_id: str, image_id: int) -> Response:
    """An 8-bit PNG any browser shows, also for DICOM and 16-bit uploads."""
    image = get_image_or_404(study_id, image_id)
    try:
        png = to_display_png(decode_image(image.data, Limits(max_bytes=len(image.data) + 1)))
    except ImageError:
        abort(422, description="this image cannot be rendered")
    return _private(Response(png, mimetype="image/png"))


@bp.get("/heatmap.png")
def heatmap(study_id: str, image_id: int) -> Response:
    """The Grad-CAM overlay, drawn on first request from the map the worker stored."""
    image = get_image_or_404(study_id, image_id)
    png = overlay_for(db.session, image.id)
    if png is None:
        abort(404, description="no heatmap for this image (yet)")
    return _private(Response(png, mimetype="image/png"))
