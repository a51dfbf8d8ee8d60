"""devices speaking the AWS IoT Jobs API

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 10:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("protocol", sa.String(length=16), nullable=False, server_default="fleet"))
    op.create_table(
        "job_executions",
        sa.Column("device_update_id", sa.Integer(), nullable=False),
        sa.Column("execution_number", sa.Integer(), nullable=False),
        sa.Column("version_number", sa.Integer(), nullable=False),
        sa.Column("status_details", sa.JSON(), nullable=False),
        sa.Column("device_status", sa.String(length=16), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_update_id"],
            ["device_updates.id"],
            name=op.f("fk_job_executions_device_update_id_device_updates"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_update_id", "execution_number", name=op.f("pk_job_executions")),
    )


def downgrade() -> None:
    op.drop_table("job_executions")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("protocol")
