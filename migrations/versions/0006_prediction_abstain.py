"""The input gate's verdict on each prediction: why it abstained (if it did) and which gate ran.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("abstain_reason", sa.String(32), nullable=True))
        batch.add_column(sa.Column("gate_version", sa.String(64), nullable=True))
        batch.add_column(sa.Column("gate_frontal_probability", sa.Float(), nullable=True))
        batch.add_column(sa.Column("gate_distance", sa.Float(), nullable=True))
        batch.create_index("ix_predictions_abstain_reason", ["abstain_reason"])


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_index("ix_predictions_abstain_reason")
        batch.drop_column("gate_distance")
        batch.drop_column("gate_frontal_probability")
        batch.drop_column("gate_version")
        batch.drop_column("abstain_reason")
