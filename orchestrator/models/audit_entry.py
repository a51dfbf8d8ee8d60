"""The audit log: who did what to which object, when, and how it ended. Append-only."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.models.base import Base, utcnow


class AuditEntry(Base):
    __tablename__ = "audit_entries"
    __table_args__ = (
        Index("ix_audit_entries_action", "action", "id"),
        Index("ix_audit_entries_target", "target_kind", "target_id", "id"),
        Index("ix_audit_entries_actor", "actor", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(140), doc="api:<token name> | cli:<user> | system | scheduler")
    token_name: Mapped[str | None] = mapped_column(String(100))
    role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64), doc="e.g. rollout.pause, firmware.upload, token.create")
    target_kind: Mapped[str | None] = mapped_column(
        String(32), doc="rollout | firmware | device | group | token"
    )
    target_id: Mapped[str | None] = mapped_column(String(128))
    outcome: Mapped[str] = mapped_column(String(32), doc="ok, or the error code (forbidden, conflict, ...)")
    status: Mapped[int | None] = mapped_column(doc="HTTP status of an API action")
    detail: Mapped[dict[str, Any] | None]
