"""One device's update inside a rollout; owns the per-device state machine."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.models.base import Base, utcnow
from orchestrator.state_machines import UpdateState


class DeviceUpdate(Base):
    __tablename__ = "device_updates"
    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id"),
        Index("ix_device_updates_rollout_state", "rollout_id", "state"),
        Index("ix_device_updates_wave_state", "wave_id", "state"),
        Index("ix_device_updates_state_deadline", "state", "deadline_at"),
        Index("ix_device_updates_device", "device_id"),
        Index("ix_device_updates_state_updated", "state", "updated_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    wave_id: Mapped[int | None] = mapped_column(ForeignKey("waves.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(128), ForeignKey("devices.id"))
    state: Mapped[UpdateState] = mapped_column(String(16), default=UpdateState.PENDING)
    attempt: Mapped[int] = mapped_column(default=1)
    progress: Mapped[int] = mapped_column(default=0)
    error_code: Mapped[str | None] = mapped_column(String(32))
    last_seq: Mapped[int | None] = mapped_column(BigInteger, doc="highest report seq applied")
    deadline_at: Mapped[datetime | None] = mapped_column(doc="stage timeout; the reconciler acts after it")
    offered_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    finalized_at: Mapped[datetime | None] = mapped_column(
        doc="the finalize step ran (desired cleared, wave and thresholds checked); NULL = still due"
    )
    redrive_at: Mapped[datetime | None] = mapped_column(
        doc="earliest time the reconciler may re-send this update's current step again"
    )
    stop_requested_at: Mapped[datetime | None] = mapped_column(
        doc="an operator asked the device to stop; no install stage is sent after this"
    )
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Workers, ingest and the reconciler all write here: every change is a compare-and-set on this.
    version: Mapped[int] = mapped_column(default=1)

    __mapper_args__ = {"version_id_col": version}
