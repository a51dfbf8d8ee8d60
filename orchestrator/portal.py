"""Progress documents for the retained portal topics (what a browser shows after a reload)."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.models import DeviceUpdate, Rollout, Wave, utcnow
from orchestrator.pacing import pacing_view
from orchestrator.policy import policy_of
from orchestrator.protocol import PortalDevice, PortalRollout, portal_device_topic, portal_rollout_topic
from orchestrator.state_machines import ROLLOUT_END_STATES, UPDATE_END_STATES, UpdateState


def device_message(
    *,
    rollout_id: int,
    device_id: str,
    update_id: int,
    state: str,
    attempt: int,
    progress: int = 0,
    error: str | None = None,
    running_version: str | None = None,
) -> tuple[str, bytes]:
    doc = PortalDevice(
        device_id=device_id,
        update_id=update_id,
        state=state,
        attempt=attempt,
        progress=progress,
        error=error,
        running_version=running_version,
        ts=time.time(),
    )
    return portal_device_topic(rollout_id, device_id), doc.to_payload()


def _epoch(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return round((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp(), 3)


def rollout_summary(session: Session, rollout_id: int) -> PortalRollout | None:
    """Counts per state, per-wave progress, percent done and a naive ETA, read from SQL."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        return None
    per_wave: dict[int | None, dict[str, int]] = defaultdict(dict)
    counts: dict[str, int] = defaultdict(int)
    rows = session.execute(
        select(DeviceUpdate.wave_id, DeviceUpdate.state, func.count())
        .where(DeviceUpdate.rollout_id == rollout_id)
        .group_by(DeviceUpdate.wave_id, DeviceUpdate.state)
    )
    for wave_id, state, count in rows:
        per_wave[wave_id][str(state)] = count
        counts[str(state)] += count
    total = sum(counts.values())
    ended = sum(counts.get(str(s), 0) for s in UPDATE_END_STATES)
    waves: list[dict[str, Any]] = []
    for wave in session.scalars(select(Wave).where(Wave.rollout_id == rollout_id).order_by(Wave.index)):
        wave_counts = per_wave.get(wave.id, {})
        waves.append(
            {
                "index": wave.index,
                "status": str(wave.status),
                "size": wave.size,
                "done": sum(wave_counts.get(str(s), 0) for s in UPDATE_END_STATES),
                "succeeded": wave_counts.get(UpdateState.SUCCEEDED, 0),
                "started_at": _epoch(wave.started_at),
                "finished_at": _epoch(wave.finished_at),
            }
        )
    eta: float | None = None
    if rollout.started_at is not None and rollout.finished_at is None and 0 < ended < total:
        elapsed = time.time() - rollout.started_at.timestamp()
        eta = round(elapsed / ended * (total - ended), 1)
    skipped: dict[str, int] = {}
    if counts.get(UpdateState.SKIPPED):
        reasons = session.execute(
            select(DeviceUpdate.error_code, func.count())
            .where(DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.state == UpdateState.SKIPPED)
            .group_by(DeviceUpdate.error_code)
        )
        skipped = {str(code or "unknown"): n for code, n in reasons}
    pacing = None
    if rollout.status not in ROLLOUT_END_STATES:
        policy = policy_of(rollout.id, rollout.created_at, rollout.policy)
        pacing = pacing_view(session, rollout.id, policy, rollout.started_at, utcnow())
    return PortalRollout(
        rollout_id=rollout.id,
        name=rollout.name,
        status=str(rollout.status),
        total=total,
        counts=dict(counts),
        percent=round(100.0 * ended / total, 1) if total else 100.0,
        current_wave=rollout.current_wave,
        waves=waves,
        eta_seconds=eta,
        skipped=skipped,
        pacing=pacing,
        ts=time.time(),
    )


def rollout_message(session: Session, rollout_id: int) -> tuple[str, bytes] | None:
    summary = rollout_summary(session, rollout_id)
    if summary is None:
        return None
    return portal_rollout_topic(rollout_id), summary.to_payload()
