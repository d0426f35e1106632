"""The Grad-CAM map itself, so the worker no longer draws heatmaps: the web draws one when it is
first asked for (webapp/media/heatmaps.py) and keeps it in heatmap_png.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("heatmap_cam", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("heatmap_cam")
