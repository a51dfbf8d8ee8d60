"""A campaign: one firmware image to a selection of devices, in waves, under a policy."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.models.base import Base, utcnow
from orchestrator.state_machines import RolloutState


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    firmware_id: Mapped[int] = mapped_column(ForeignKey("firmware.id"), index=True)
    status: Mapped[RolloutState] = mapped_column(String(16), default=RolloutState.SCHEDULED, index=True)
    # Deferred: an explicit target can list a million ids, and the engine loads rollouts per task.
    target: Mapped[dict[str, Any]] = mapped_column(
        deferred=True, doc="{device_ids: [...]} or {model, labels}"
    )
    policy: Mapped[dict[str, Any]] = mapped_column(doc="orchestrator.policy.RolloutPolicy as JSON")
    total: Mapped[int] = mapped_column(default=0)
    current_wave: Mapped[int | None]
    reason: Mapped[str | None] = mapped_column(String(200), doc="why it halted or was aborted")
    start_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Every admission of devices into flight bumps this with a compare-and-set, so two concurrent
    # admissions cannot both fill the same free slots (max_in_flight is a hard cap).
    admission_seq: Mapped[int] = mapped_column(default=0, server_default="0")
    # Operators, workers and the reconciler all change rollouts: optimistic locking.
    version: Mapped[int] = mapped_column(default=1)

    __mapper_args__ = {"version_id_col": version}
