"""The audit log: one row per thing a person did. Ids and codes only, never image bytes or patient data."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from flask import has_request_context, request
from flask_login import current_user
from sqlalchemy import Select, select

from webapp.extensions import db
from webapp.models import AuditEvent, User, utcnow

log = logging.getLogger(__name__)

# Every action the log knows, with what it means (the admin page lists them).
ACTIONS: dict[str, str] = {
    "login": "signed in",
    "login_failed": "failed to sign in (reason in detail)",
    "logout": "signed out",
    "password_changed": "changed a password",
    "user_created": "created an account",
    "user_updated": "activated, deactivated, unlocked or changed the role of an account",
    "token_created": "created an API token",
    "token_revoked": "revoked an API token",
    "study_uploaded": "uploaded a study",
    "study_viewed": "opened a study (page or API)",
    "image_downloaded": "downloaded an original image",
    "studies_exported": "exported the studies list",
    "outcome_recorded": "recorded or changed the RT-PCR outcome",
    "impression_recorded": "recorded a read-first impression",
    "pacs_send_retried": "asked for a failed send to the PACS to be tried again",
}
# Detail values are short scalars: codes, counts, ids. Longer text is refused.
MAX_DETAIL_TEXT = 64


def _clean_detail(detail: dict[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in detail.items():
        if value is None or isinstance(value, bool | int | float) or isinstance(value, str) and len(value) <= MAX_DETAIL_TEXT:
            clean[key] = value
        else:
            raise ValueError(f"audit detail {key!r} must be a short scalar, got {type(value).__name__}")
    return clean


def _current_user() -> User | None:
    if has_request_context() and current_user.is_authenticated:
        return current_user._get_current_object()
    return None


def record(
    action: str,
    *,
    user: User | None = None,
    actor: str | None = None,
    study_id: str | None = None,
    dedupe_s: float | None = None,
    **detail: Any,
) -> None:
    """Append an event and commit. ``dedupe_s`` skips a repeat of the same user/action/study."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    user = user or _current_user()
    if dedupe_s is not None and user is not None:
        since = utcnow() - timedelta(seconds=dedupe_s)
        seen = db.session.scalar(
            select(AuditEvent.id)
            .where(AuditEvent.user_id == user.id, AuditEvent.action == action,
                   AuditEvent.study_id == study_id, AuditEvent.at >= since)
            .limit(1)
        )
        if seen is not None:
            return
    event = AuditEvent(
        user_id=user.id if user else None,
        actor=(actor or (user.email if user else None) or "")[:254] or None,
        action=action,
        study_id=study_id,
        detail=_clean_detail(detail),
        ip=request.remote_addr if has_request_context() else None,
    )
    db.session.add(event)
    db.session.commit()
    log.info("event=audit action=%s user=%s study=%s", action, event.user_id, study_id)


def query(
    *,
    action: str | None = None,
    actor: str | None = None,
    study_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Select:
    """Events matching every given filter, newest first."""
    stmt = select(AuditEvent)
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    if actor:
        stmt = stmt.where(AuditEvent.actor == actor.strip().lower())
    if study_id:
        stmt = stmt.where(AuditEvent.study_id == study_id.strip())
    if since:
        stmt = stmt.where(AuditEvent.at >= since)
    if until:
        stmt = stmt.where(AuditEvent.at < until)
    return stmt.order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
