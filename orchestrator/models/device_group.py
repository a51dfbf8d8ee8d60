"""A saved group: a named filter over the inventory that rollouts can target."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.models.base import Base, utcnow


class DeviceGroup(Base):
    __tablename__ = "device_groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    filter: Mapped[dict[str, Any]] = mapped_column(doc="orchestrator.policy.DeviceFilter as JSON")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
