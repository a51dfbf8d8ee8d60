"""rollout policy: operator tags, saved groups, firmware deprecation

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("tags", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("firmware") as batch:
        batch.add_column(sa.Column("deprecated_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "device_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("filter", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_groups")),
        sa.UniqueConstraint("name", name=op.f("uq_device_groups_name")),
    )


def downgrade() -> None:
    op.drop_table("device_groups")
    with op.batch_alter_table("firmware") as batch:
        batch.drop_column("deprecated_at")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("tags")
