"""Users, passwords, lockout and browser sessions: the rules, shared by views and the CLI."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from functools import cache

from flask import current_app
from sqlalchemy import delete, func, select, update
from werkzeug.security import check_password_hash, generate_password_hash

from webapp.extensions import db
from webapp.models import LoginSession, Role, User, as_utc, utcnow

log = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 12
MAX_LOCKOUT_S = 3600
EMAIL_PATTERN = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}$")
# last_seen_at is written at most this often, not on every request.
TOUCH_EVERY = timedelta(seconds=60)


class AccountError(ValueError):
    """A request about an account that cannot be done; the message is for people."""


@cache
def _dummy_hash() -> str:
    # Checked against when the email is unknown, so that a miss costs as much as a hit.
    return generate_password_hash(secrets.token_hex(16))


def sha256_hex(value: str) -> str:
    """The stored form of a secret that is only ever compared, never shown again."""
    return hashlib.sha256(value.encode()).hexdigest()


def normalise_email(email: str) -> str:
    """Emails are compared case-insensitively; they are stored lower-cased."""
    email = (email or "").strip().lower()
    if not EMAIL_PATTERN.match(email):
        raise AccountError("enter an email address such as name@hospital.org")
    return email


def check_password_strength(password: str) -> None:
    """At least MIN_PASSWORD_LENGTH characters (length beats composition rules)."""
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


def generate_password() -> str:
    """A random password to hand over once (about 120 bits)."""
    return secrets.token_urlsafe(15)


def find_user(email: str) -> User | None:
    """The user with this email, if any."""
    try:
        email = normalise_email(email)
    except AccountError:
        return None
    return db.session.scalar(select(User).where(User.email == email))


def user_count() -> int:
    """How many accounts exist (the login page explains how to make the first)."""
    return db.session.scalar(select(func.count()).select_from(User)) or 0


def create_user(email: str, password: str, role: str = Role.CLINICIAN) -> User:
    """A new active user; the password is hashed with werkzeug's scrypt."""
    email = normalise_email(email)
    check_password_strength(password)
    if role not in {r.value for r in Role}:
        raise AccountError(f"role must be one of {', '.join(r.value for r in Role)}")
    if find_user(email) is not None:
        raise AccountError(f"an account for {email} already exists")
    user = User(
        email=email,
        password_hash=generate_password_hash(password),
        role=role,
        active=True,
        failed_logins=0,
    )
    db.session.add(user)
    db.session.commit()
    log.info("event=user_created user=%s role=%s", user.id, role)
    return user


def set_password(user: User, password: str) -> None:
    """Change the password, clear any lockout and end every session of the user."""
    check_password_strength(password)
    user.password_hash = generate_password_hash(password)
    user.failed_logins = 0
    user.locked_until = None
    db.session.commit()
    end_all_sessions(user.id)


def set_active(user: User, active: bool) -> None:
    """Deactivating ends the user's sessions; their tokens stop working too."""
    user.active = active
    db.session.commit()
    if not active:
        end_all_sessions(user.id)


def set_role(user: User, role: str) -> None:
    """Promote or demote; the user's sessions end so the new role applies at once."""
    user.role = role
    db.session.commit()
    end_all_sessions(user.id)


def unlock(user: User) -> None:
    """Clear failed attempts and any lockout."""
    user.failed_logins = 0
    user.locked_until = None
    db.session.commit()


@dataclass(frozen=True)
class LoginResult:
    """The user on success; otherwise why not (for the audit log only, never shown)."""

    user: User | None
    reason: str | None = None


def _lockout_seconds(failures: int) -> int:
    after = current_app.config["LOCKOUT_AFTER_FAILURES"]
    if failures < after:
        return 0
    return min(current_app.config["LOCKOUT_BASE_S"] * 2 ** (failures - after), MAX_LOCKOUT_S)


def authenticate(email: str, password: str) -> LoginResult:
    """Check a password with per-account back-off: N failures lock, each further one doubles it."""
    user = find_user(email)
    if user is None or not user.active:
        check_password_hash(_dummy_hash(), password or "")
        return LoginResult(None, "unknown_user" if user is None else "inactive")
    now = utcnow()
    locked_until = as_utc(user.locked_until)
    if locked_until is not None and locked_until > now:
        check_password_hash(_dummy_hash(), password or "")
        return LoginResult(None, "locked")
    if not check_password_hash(user.password_hash, password or ""):
        # Atomic increment: two parallel guesses both count.
        db.session.execute(
            update(User).where(User.id == user.id).values(failed_logins=User.failed_logins + 1)
        )
        db.session.refresh(user)
        seconds = _lockout_seconds(user.failed_logins)
        if seconds:
            user.locked_until = now + timedelta(seconds=seconds)
        db.session.commit()
        return LoginResult(None, "bad_password")
    user.failed_logins = 0
    user.locked_until = None
    user.last_login_at = now
    db.session.commit()
    return LoginResult(user)


def start_session(user: User) -> str:
    """A new server-side session; returns the key the cookie carries."""
    key = secrets.token_urlsafe(32)
    db.session.add(LoginSession(id=sha256_hex(key), user_id=user.id))
    db.session.commit()
    user.session_key = key
    return key


def load_session(key: str) -> User | None:
    """The user of a live session, or None when it ended, idled out or the user is inactive."""
    row = db.session.get(LoginSession, sha256_hex(key))
    if row is None:
        return None
    now = utcnow()
    idle = timedelta(minutes=current_app.config["SESSION_IDLE_MINUTES"])
    if as_utc(row.last_seen_at) + idle < now or not row.user.active:
        db.session.delete(row)
        db.session.commit()
        return None
    if as_utc(row.last_seen_at) + TOUCH_EVERY < now:
        row.last_seen_at = now
        db.session.commit()
    row.user.session_key = key
    return row.user


def end_session(key: str | None) -> None:
    """Logout: the row goes, so the cookie is worthless even if someone kept a copy."""
    if key:
        db.session.execute(delete(LoginSession).where(LoginSession.id == sha256_hex(key)))
        db.session.commit()


def end_all_sessions(user_id: int) -> None:
    """Every browser of this user is signed out."""
    db.session.execute(delete(LoginSession).where(LoginSession.user_id == user_id))
    db.session.commit()
