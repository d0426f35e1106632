"""Looking studies up for views; access rules will live here too."""

from __future__ import annotations

import uuid

from flask import abort

from webapp.extensions import db
from webapp.models import Image, Study


def get_study_or_404(study_id: str) -> Study:
    """The study with this id, or 404 (also for ids that are not UUIDs)."""
    try:
        uuid.UUID(study_id)
    except ValueError:
        abort(404, description="no such study")
    study = db.session.get(Study, study_id)
    if study is None:
        abort(404, description="no such study")
    return study


def get_image_or_404(study_id: str, image_id: int) -> Image:
    """An image of a study, or 404 when either is unknown or they do not belong together."""
    study = get_study_or_404(study_id)
    image = db.session.get(Image, image_id)
    if image is None or image.study_id != study.id:
        abort(404, description="no such image")
    return image
