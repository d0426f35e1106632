"""Looking studies up for views, with the access rule: clinicians see their own, admins all.

Every view that reads a study goes through here, so a study that is not yours
is indistinguishable from one that does not exist (404).
"""

from __future__ import annotations

import uuid

from flask import abort
from flask_login import current_user
from sqlalchemy import Select, select

from webapp.extensions import db
from webapp.models import Image, Study


def visible_studies() -> Select:
    """SELECT of the studies the signed-in user may see."""
    query = select(Study)
    if not current_user.is_admin:
        query = query.where(Study.owner_id == current_user.id)
    return query


def may_see(study: Study) -> bool:
    """Whether the signed-in user may see this study."""
    return current_user.is_admin or (
        study.owner_id is not None and study.owner_id == current_user.id
    )


def get_study_or_404(study_id: str) -> Study:
    """The study with this id if the user may see it, or 404 (also for ids that are not UUIDs)."""
    try:
        uuid.UUID(study_id)
    except ValueError:
        abort(404, description="no such study")
    study = db.session.get(Study, study_id)
    if study is None or not may_see(study):
        abort(404, description="no such study")
    return study


def get_image_or_404(study_id: str, image_id: int) -> Image:
    """An image of a visible study, or 404 when either is unknown or they do not belong together."""
    study = get_study_or_404(study_id)
    image = db.session.get(Image, image_id)
    if image is None or image.study_id != study.id:
        abort(404, description="no such image")
    return image
