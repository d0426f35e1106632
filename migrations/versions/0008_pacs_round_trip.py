"""The PACS round trip: dicom_origins (where a study came from, identifiers until sent) and pacs_sends.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_origins",
        sa.Column("study_id", sa.String(36), sa.ForeignKey("studies.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("via", sa.String(8), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=True),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("identifiers", sa.JSON(), nullable=True),
        sa.Column("identifiers_deleted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "pacs_sends",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.String(36), sa.ForeignKey("studies.id", ondelete="CASCADE"),
                  nullable=False, unique=True),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("objects", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_pacs_sends_status", "pacs_sends", ["status"])
    op.create_index("ix_pacs_sends_next_attempt_at", "pacs_sends", ["next_attempt_at"])


def downgrade() -> None:
    op.drop_table("pacs_sends")
    op.drop_table("dicom_origins")
