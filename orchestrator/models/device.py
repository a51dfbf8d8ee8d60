"""A physical or simulated unit as the inventory knows it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.models.base import Base, utcnow


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), index=True)
    firmware_version: Mapped[str] = mapped_column(String(64), index=True)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="what the device reports about itself")
    # Set by operators only; what the device reports (labels) never overwrites them.
    tags: Mapped[list[str]] = mapped_column(default=list, server_default="[]")
    online: Mapped[bool] = mapped_column(default=False)
    # How the device talks: "fleet" (fleet's agent) or "aws-jobs" (the AWS IoT Jobs MQTT API).
    protocol: Mapped[str] = mapped_column(String(16), default="fleet", server_default="fleet")
    slot: Mapped[str | None] = mapped_column(String(8))
    agent_version: Mapped[str | None] = mapped_column(String(64))
    last_seen: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
