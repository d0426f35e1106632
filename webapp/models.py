"""Typed SQLAlchemy 2.0 models: a Study, its Images, one Prediction per Image; Users and their credentials.

Also the two time helpers every module uses for stored times: `utcnow` and `as_utc`.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from flask_login import UserMixin
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import Mapped, deferred, mapped_column, relationship

from webapp.extensions import db


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the models use."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime: SQLite returns naive ones, and every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def new_id() -> str:
    """Random study id (UUID4 as text works the same on SQLite and PostgreSQL)."""
    return str(uuid.uuid4())


class Role(enum.StrEnum):
    """What a user may do: clinicians see their own studies, admins see everything."""

    CLINICIAN = "clinician"
    ADMIN = "admin"


class User(UserMixin, db.Model):
    """A person who signs in. Never deleted (audit rows point here); deactivated instead."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default=Role.CLINICIAN)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Read-first mode: hide the AI result of a study until the user has recorded their own impression.
    read_first: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # Set by the session loader: Flask-Login keeps this key, not the user id, in
    # the cookie, so ending the server-side session ends the cookie too.
    session_key = None  # str | None; a plain attribute, not a column

    @property
    def is_active(self) -> bool:  # Flask-Login refuses inactive users
        return bool(self.active)

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN

    def get_id(self) -> str | None:
        return self.session_key


class LoginSession(db.Model):
    """A signed-in browser; the cookie holds a random key, the table its sha256."""

    __tablename__ = "login_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    user: Mapped[User] = relationship()


class ApiToken(db.Model):
    """A personal API token; only its sha256 is stored, the token is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship()


class Study(db.Model):
    """One upload of one or more chest X-rays, processed as one job."""

    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # Studies from before accounts existed have no owner: only admins see them.
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", name="fk_studies_owner_id_users", ondelete="SET NULL"), index=True
    )
    patient_ref: Mapped[str | None] = mapped_column(String(64), index=True)
    accession: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The last sign of life of the worker holding the claim (attempts), renewed while it runs;
    # a RUNNING study whose heartbeat is older than LEASE_S has lost its worker.
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The confirmed outcome (ground truth) a clinician records: positive/negative/unknown.
    pcr_result: Mapped[str | None] = mapped_column(String(16), index=True)
    pcr_recorded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    pcr_recorded_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", name="fk_studies_pcr_recorded_by_users", ondelete="SET NULL")
    )
    # Read-first mode: the clinician's own impression, recorded before the AI result is shown.
    reader_impression: Mapped[str | None] = mapped_column(String(16))
    reader_impression_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    images: Mapped[list[Image]] = relationship(
        back_populates="study", order_by="Image.position", cascade="all, delete-orphan"
    )
    owner: Mapped[User | None] = relationship(foreign_keys=[owner_id])


class Image(db.Model):
    """One uploaded file; the bytes live in the database (deferred, never loaded by lists)."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("study_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(255))
    media_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bit_depth: Mapped[int] = mapped_column(Integer)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))

    study: Mapped[Study] = relationship(back_populates="images")
    prediction: Mapped[Prediction | None] = relationship(
        back_populates="image", uselist=False, cascade="all, delete-orphan"
    )
    prepared: Mapped[PreparedInput | None] = relationship(
        uselist=False, cascade="all, delete-orphan"
    )


class PreparedInput(db.Model):
    """An image's model input, made at intake (ml/prepared.py) so the worker need not decode it;
    used only when its key matches the served model's, and dropped once its study is done."""

    __tablename__ = "prepared_inputs"

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Prediction(db.Model):
    """The model's output for one image; unique per image so a retry cannot duplicate it."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), unique=True
    )
    probability_covid: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(128), index=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    model_trained: Mapped[bool] = mapped_column(Boolean)
    preprocess_version: Mapped[str] = mapped_column(String(16))
    inference_ms: Mapped[float] = mapped_column(Float)
    backend: Mapped[str] = mapped_column(String(16), server_default="keras")
    # The input gate (ml/gate.py): a reason means label "indeterminate", no reading given;
    # the probability is kept for audit only. gate_version None: the model had no gate.
    abstain_reason: Mapped[str | None] = mapped_column(String(32), index=True)
    gate_version: Mapped[str | None] = mapped_column(String(64))
    gate_frontal_probability: Mapped[float | None] = mapped_column(Float)
    gate_distance: Mapped[float | None] = mapped_column(Float)
    # The worker stores the normalised Grad-CAM map (ml.overlay.encode_cam, a few hundred bytes);
    # the overlay PNG is drawn from it and the image on first request and kept (webapp/media/heatmaps.py).
    heatmap_cam: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    heatmap_png: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    image: Mapped[Image] = relationship(back_populates="prediction")


class AuditEvent(db.Model):
    """Who did what, when, to which study: ids and codes only, never image bytes or patient data."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    # The account as typed or known at the time (failed logins have no user row).
    actor: Mapped[str | None] = mapped_column(String(254))
    action: Mapped[str] = mapped_column(String(32), index=True)
    # No foreign key: the log outlives the studies it mentions.
    study_id: Mapped[str | None] = mapped_column(String(36), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ip: Mapped[str | None] = mapped_column(String(45))
