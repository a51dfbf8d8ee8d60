"""audit log, stop requests, events by device

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_entries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=140), nullable=False),
        sa.Column("token_name", sa.String(length=100), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_kind", sa.String(length=32), nullable=True),
        sa.Column("target_id", sa.String(length=128), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_entries")),
    )
    with op.batch_alter_table("device_updates") as batch:
        batch.add_column(sa.Column("stop_requested_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("events") as batch:
        batch.create_index("ix_events_device", ["device_id", "id"])
    with op.batch_alter_table("audit_entries") as batch:
        batch.create_index("ix_audit_entries_action", ["action", "id"])
        batch.create_index("ix_audit_entries_target", ["target_kind", "target_id", "id"])
        batch.create_index("ix_audit_entries_actor", ["actor", "id"])
        batch.create_index(batch.f("ix_audit_entries_created_at"), ["created_at"])


def downgrade() -> None:
    op.drop_table("audit_entries")
    with op.batch_alter_table("events") as batch:
        batch.drop_index("ix_events_device")
    with op.batch_alter_table("device_updates") as batch:
        batch.drop_column("stop_requested_at")
