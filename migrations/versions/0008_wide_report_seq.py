"""report sequence numbers as 64-bit integers

The report model admits any seq up to 2^63 - 1 (a device may count in milliseconds since the
epoch); PostgreSQL's INTEGER stops at 2^31 - 1.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 11:35:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device_updates") as batch:
        batch.alter_column(
            "last_seq", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=True
        )
    with op.batch_alter_table("events") as batch:
        batch.alter_column("seq", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.alter_column("seq", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=True)
    with op.batch_alter_table("device_updates") as batch:
        batch.alter_column(
            "last_seq", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=True
        )
