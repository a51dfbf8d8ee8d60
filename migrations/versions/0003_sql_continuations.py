"""engine state in SQL: finalized marker, redrive schedule, admission sequence

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device_updates") as batch:
        batch.add_column(sa.Column("finalized_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("redrive_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_device_updates_state_updated", ["state", "updated_at"])
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("admission_seq", sa.Integer(), nullable=False, server_default="0"))
    # Rows that ended before this revision were finalized by the old engine.
    op.execute(
        "UPDATE device_updates SET finalized_at = COALESCE(finished_at, updated_at) "
        "WHERE state IN ('SUCCEEDED','FAILED','ROLLED_BACK','TIMED_OUT','SKIPPED','CANCELED')"
    )


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("admission_seq")
    with op.batch_alter_table("device_updates") as batch:
        batch.drop_index("ix_device_updates_state_updated")
        batch.drop_column("redrive_at")
        batch.drop_column("finalized_at")
