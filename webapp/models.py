"""Typed SQLAlchemy 2.0 models: a Study, its Images, one Prediction per Image."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

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
from sqlalchemy.orm import Mapped, deferred, mapped_column, relationship

from webapp.extensions import db


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the models use."""
    return datetime.now(UTC)


def new_id() -> str:
    """Random study id (UUID4 as text works the same on SQLite and PostgreSQL)."""
    return str(uuid.uuid4())


class Study(db.Model):
    """One upload of one or more chest X-rays, processed as one job."""

    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # Accounts arrive with their own issue; the column exists so that attaching
    # an owner needs a foreign key, not a new column and a backfill.
    owner_id: Mapped[int | None] = mapped_column(Integer, index=True)
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

    images: Mapped[list[Image]] = relationship(
        back_populates="study", order_by="Image.position", cascade="all, delete-orphan"
    )


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
    heatmap_png: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    image: Mapped[Image] = relationship(back_populates="prediction")
