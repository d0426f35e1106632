"""Personal API tokens: created and shown once, stored as sha256, sent as `Authorization: Bearer`."""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta

from flask import current_app
from sqlalchemy import select

from webapp.accounts import AccountError, sha256_hex
from webapp.extensions import db
from webapp.models import ApiToken, User, as_utc, utcnow

log = logging.getLogger(__name__)

TOKEN_PREFIX = "cxr_"
# last_used_at is written at most this often, not on every request.
TOUCH_EVERY = timedelta(seconds=60)


def create_token(user: User, name: str, days: int | None = None) -> tuple[ApiToken, str]:
    """A new token for the user; returns the row and the only copy of the secret."""
    name = (name or "").strip()[:64]
    if not name:
        raise AccountError("give the token a name, e.g. the script or machine that uses it")
    max_days = current_app.config["API_TOKEN_MAX_DAYS"]
    days = max_days if days is None else days
    if not 1 <= days <= max_days:
        raise AccountError(f"a token lives between 1 and {max_days} days")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        user_id=user.id,
        name=name,
        token_hash=sha256_hex(secret),
        prefix=secret[:10],
        expires_at=utcnow() + timedelta(days=days),
    )
    db.session.add(token)
    db.session.commit()
    log.info("event=token_created user=%s token=%s", user.id, token.id)
    return token, secret


def user_for_token(secret: str) -> User | None:
    """The active owner of a live (unrevoked, unexpired) token, else None."""
    if not secret.startswith(TOKEN_PREFIX):
        return None
    token = db.session.scalar(select(ApiToken).where(ApiToken.token_hash == sha256_hex(secret)))
    now = utcnow()
    if token is None or token.revoked_at is not None or as_utc(token.expires_at) <= now:
        return None
    if not token.user.active:
        return None
    last_used = as_utc(token.last_used_at)
    if last_used is None or last_used + TOUCH_EVERY < now:
        token.last_used_at = now
        db.session.commit()
    return token.user


def tokens_of(user: User) -> list[ApiToken]:
    """A user's tokens, newest first, revoked and expired ones included."""
    return list(
        db.session.scalars(
            select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id.desc())
        )
    )


def revoke_token(token_id: int, owner: User | None = None) -> ApiToken:
    """Revoke a token (of ``owner`` when given); AccountError when there is no such token."""
    token = db.session.get(ApiToken, token_id)
    if token is None or (owner is not None and token.user_id != owner.id):
        raise AccountError("no such token")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        db.session.commit()
        log.info("event=token_revoked user=%s token=%s", token.user_id, token.id)
    return token


def token_state(token: ApiToken) -> str:
    """'active', 'revoked' or 'expired', for lists."""
    if token.revoked_at is not None:
        return "revoked"
    if as_utc(token.expires_at) <= utcnow():
        return "expired"
    return "active"
