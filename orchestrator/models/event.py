"""Append-only audit trail: every transition, every device report, every operator action."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.models.base import Base, utcnow


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_update", "device_update_id", "id"),
        Index("ix_events_rollout", "rollout_id", "id"),
        Index("ix_events_device", "device_id", "id"),
    )

    # BIGINT on PostgreSQL; SQLite only auto-increments an INTEGER primary key.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16), doc="transition | report | operator | inventory")
    name: Mapped[str] = mapped_column(String(32), doc="event name or report state")
    rollout_id: Mapped[int | None]
    wave_id: Mapped[int | None]
    device_update_id: Mapped[int | None]
    device_id: Mapped[str | None] = mapped_column(String(128))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    attempt: Mapped[int | None]
    seq: Mapped[int | None] = mapped_column(BigInteger)
    accepted: Mapped[bool] = mapped_column(default=True, doc="false for ignored (late/duplicate) reports")
    detail: Mapped[dict[str, Any] | None]
