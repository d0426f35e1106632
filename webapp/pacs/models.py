"""Tables of the PACS round trip: where a study came from, and its results' way back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from webapp.extensions import db
from webapp.models import utcnow


class DicomOrigin(db.Model):
    """A study received over DICOM (listener or STOW-RS), and until its results are back, whose it is."""

    __tablename__ = "dicom_origins"

    study_id: Mapped[str] = mapped_column(
        ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True
    )
    via: Mapped[str] = mapped_column(String(8))  # "dimse" (the listener) or "stow"
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The patient's and study's original identifiers and each image's original UIDs
    # (webapp/pacs/identity.py), kept only until the results are delivered: set to None
    # by a successful send, or when there is nothing to send.
    # none_as_null: deleted means SQL NULL, not the JSON value null, so IS NULL finds it.
    identifiers: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    identifiers_deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PacsSend(db.Model):
    """One study's report and heatmaps on their way to the PACS; changed only by webapp/pacs/sends.py."""

    __tablename__ = "pacs_sends"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # One send per study: finishing twice cannot queue the results twice.
    study_id: Mapped[str] = mapped_column(
        ForeignKey("studies.id", ondelete="CASCADE"), unique=True
    )
    destination: Mapped[str] = mapped_column(String(255))  # PACS_DESTINATION, never credentials
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending/sending/sent/failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    objects: Mapped[int] = mapped_column(Integer, default=0)  # DICOM instances delivered
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                      index=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
