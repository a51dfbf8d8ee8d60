"""An ordered slice of a rollout's devices with a success gate."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.models.base import Base, utcnow
from orchestrator.state_machines import WaveState


class Wave(Base):
    __tablename__ = "waves"
    __table_args__ = (UniqueConstraint("rollout_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    index: Mapped[int]
    size: Mapped[int]
    status: Mapped[WaveState] = mapped_column(String(16), default=WaveState.PENDING)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    version: Mapped[int] = mapped_column(default=1)

    __mapper_args__ = {"version_id_col": version}
