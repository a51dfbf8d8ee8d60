"""What the AWS IoT Jobs API keeps about an execution beyond its device update: its version
number, the status details the device last set, when it started, and a status the device chose
that fleet's states do not tell apart (REJECTED)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.models.base import Base, utcnow


class JobExecution(Base):
    __tablename__ = "job_executions"

    device_update_id: Mapped[int] = mapped_column(
        ForeignKey("device_updates.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    execution_number: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    version_number: Mapped[int] = mapped_column(default=1)
    status_details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    device_status: Mapped[str | None] = mapped_column(String(16))
    started_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
