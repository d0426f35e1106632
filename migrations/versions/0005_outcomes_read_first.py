"""Ground truth and read-first: a study's RT-PCR outcome and the reader's own impression.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("pcr_result", sa.String(16), nullable=True))
        batch.add_column(sa.Column("pcr_recorded_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("pcr_recorded_by", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reader_impression", sa.String(16), nullable=True))
        batch.add_column(sa.Column("reader_impression_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_studies_pcr_result", ["pcr_result"])
        batch.create_foreign_key(
            "fk_studies_pcr_recorded_by_users", "users", ["pcr_recorded_by"], ["id"],
            ondelete="SET NULL",
        )
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("read_first", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("read_first")
    with op.batch_alter_table("studies") as batch:
        batch.drop_constraint("fk_studies_pcr_recorded_by_users", type_="foreignkey")
        batch.drop_index("ix_studies_pcr_result")
        for column in ("reader_impression_at", "reader_impression", "pcr_recorded_by",
                       "pcr_recorded_at", "pcr_result"):
            batch.drop_column(column)
