"""Record which inference backend produced each prediction.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(
            sa.Column("backend", sa.String(16), nullable=False, server_default="keras")
        )


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("backend")
