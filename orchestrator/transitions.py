"""Applies state-machine events to rows and records them as Events.

This is the only module that assigns ``state``/``status``. Single-row changes go through the ORM
(optimistic ``version`` check raises ``StaleDataError`` on a concurrent writer); bulk changes are
compare-and-set UPDATEs that only touch rows still in the expected state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from orchestrator.models import DeviceUpdate, Event, Rollout, Wave, utcnow
from orchestrator.state_machines import (
    UPDATE_END_STATES,
    RolloutEvent,
    RolloutState,
    UpdateEvent,
    UpdateState,
    WaveEvent,
    WaveState,
    next_rollout_state,
    next_update_state,
    next_wave_state,
)


def _event_row(
    du: DeviceUpdate, event: UpdateEvent, old: UpdateState, new: UpdateState, detail: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "kind": "transition",
        "name": str(event),
        "rollout_id": du.rollout_id,
        "wave_id": du.wave_id,
        "device_update_id": du.id,
        "device_id": du.device_id,
        "from_state": str(old),
        "to_state": str(new),
        "attempt": du.attempt,
        "detail": detail,
        "created_at": utcnow(),
    }


def transition_update(
    session: Session,
    du: DeviceUpdate,
    event: UpdateEvent,
    *,
    error_code: str | None = None,
    deadline_at: datetime | None = None,
    detail: dict[str, Any] | None = None,
) -> UpdateState:
    """Apply ``event`` to a loaded DeviceUpdate; raises IllegalTransition if the table forbids it.

    The caller commits; a concurrent change to the same row makes the flush raise StaleDataError.
    """
    old = du.state
    new = next_update_state(old, event, entity_id=du.id)
    now = utcnow()
    if event == UpdateEvent.REQUEUE:
        du.attempt += 1
        du.progress = 0
        du.error_code = None
    du.state = new
    du.updated_at = now
    if new == UpdateState.OFFERED:
        du.offered_at = now
    if new in UPDATE_END_STATES or new == UpdateState.RETRYING:
        du.deadline_at = None
    else:
        du.deadline_at = deadline_at
    if new in UPDATE_END_STATES:
        du.finished_at = now
    if new == UpdateState.SUCCEEDED:
        du.progress = 100
    if error_code is not None:
        du.error_code = error_code
    session.add(Event(**_event_row(du, event, old, new, detail)))
    return new


@dataclass(frozen=True, slots=True)
class ReportChange:
    """A device report's effect on one row, computed from a snapshot (id, version, state)."""

    du_id: int
    expected_version: int
    event: UpdateEvent
    old: UpdateState
    new: UpdateState
    progress: int
    error_code: str | None
    seq: int
    deadline_at: datetime | None


def apply_report_change(session: Session, change: ReportChange, event_row: dict[str, Any]) -> bool:
    """Compare-and-set one report-driven transition; False when another writer got there first."""
    next_update_state(change.old, change.event, entity_id=change.du_id)  # re-validate against the table
    now = utcnow()
    values: dict[str, Any] = {
        "state": change.new,
        "version": DeviceUpdate.version + 1,
        "progress": 100 if change.new == UpdateState.SUCCEEDED else change.progress,
        "last_seq": change.seq,
        "updated_at": now,
    }
    if change.new in UPDATE_END_STATES or change.new == UpdateState.RETRYING:
        values["deadline_at"] = None
    elif change.deadline_at is not None:
        values["deadline_at"] = change.deadline_at
    if change.new in UPDATE_END_STATES:
        values["finished_at"] = now
    if change.error_code is not None:
        values["error_code"] = change.error_code
    result = session.execute(
        update(DeviceUpdate)
        .where(DeviceUpdate.id == change.du_id, DeviceUpdate.version == change.expected_version)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.execute(insert(Event), [event_row])
    return True


def bulk_transition_updates(
    session: Session,
    rows: Sequence[DeviceUpdate] | Iterable[tuple[int, int, UpdateState]],
    event: UpdateEvent,
    *,
    error_code: str | None = None,
) -> list[int]:
    """Apply ``event`` to many rows at once, each only if unchanged since read; returns the ids changed.

    ``rows`` are DeviceUpdates or (id, version, state) tuples. Rows whose state does not allow the
    event are left alone (a concurrent writer moved them on).
    """
    snapshot = [(r.id, r.version, r.state) if isinstance(r, DeviceUpdate) else r for r in rows]
    if not snapshot:
        return []
    meta = {
        du_id: (rollout_id, wave_id, device_id, attempt)
        for du_id, rollout_id, wave_id, device_id, attempt in session.execute(
            select(
                DeviceUpdate.id,
                DeviceUpdate.rollout_id,
                DeviceUpdate.wave_id,
                DeviceUpdate.device_id,
                DeviceUpdate.attempt,
            ).where(DeviceUpdate.id.in_([s[0] for s in snapshot]))
        )
    }
    now = utcnow()
    changed: list[int] = []
    events: list[dict[str, Any]] = []
    for du_id, version, state in snapshot:
        try:
            new = next_update_state(UpdateState(state), event, entity_id=du_id)
        except Exception:
            continue
        values: dict[str, Any] = {"state": new, "version": version + 1, "updated_at": now}
        if new in UPDATE_END_STATES:
            values["finished_at"] = now
            values["deadline_at"] = None
        if error_code is not None:
            values["error_code"] = error_code
        result = session.execute(
            update(DeviceUpdate)
            .where(DeviceUpdate.id == du_id, DeviceUpdate.version == version)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        changed.append(du_id)
        rollout_id, wave_id, device_id, attempt = meta[du_id]
        events.append(
            {
                "kind": "transition",
                "name": str(event),
                "rollout_id": rollout_id,
                "wave_id": wave_id,
                "device_update_id": du_id,
                "device_id": device_id,
                "from_state": str(state),
                "to_state": str(new),
                "attempt": attempt,
                "detail": {"error": error_code} if error_code else None,
                "created_at": now,
            }
        )
    if events:
        session.execute(insert(Event), events)
    return changed


def initial_update_state(event: UpdateEvent | None) -> UpdateState:
    """State of a new DeviceUpdate row: PENDING, or where ``event`` (e.g. SKIP) leads from PENDING."""
    return UpdateState.PENDING if event is None else next_update_state(UpdateState.PENDING, event)


def transition_rollout(
    session: Session,
    rollout: Rollout,
    event: RolloutEvent,
    *,
    reason: str | None = None,
    actor: str = "system",
) -> RolloutState:
    """Apply ``event`` to a rollout (optimistic version check at flush); the caller commits."""
    old = rollout.status
    new = next_rollout_state(old, event, entity_id=rollout.id)
    now = utcnow()
    rollout.status = new
    if new == RolloutState.RUNNING and rollout.started_at is None:
        rollout.started_at = now
    if new in (RolloutState.COMPLETED, RolloutState.HALTED, RolloutState.ABORTED):
        rollout.finished_at = now
    if reason is not None:
        rollout.reason = reason
    session.add(
        Event(
            kind="operator" if actor != "system" else "transition",
            name=f"rollout_{event}",
            rollout_id=rollout.id,
            from_state=str(old),
            to_state=str(new),
            detail={"actor": actor, "reason": reason},
            created_at=now,
        )
    )
    return new


def transition_wave(
    session: Session, wave: Wave, event: WaveEvent, *, detail: dict[str, Any] | None = None
) -> WaveState:
    """Apply ``event`` to a wave (optimistic version check at flush); the caller commits."""
    old = wave.status
    new = next_wave_state(old, event, entity_id=wave.id)
    now = utcnow()
    wave.status = new
    if new == WaveState.RUNNING:
        wave.started_at = now
    elif new in (WaveState.PASSED, WaveState.FAILED, WaveState.CANCELED):
        wave.finished_at = now
    session.add(
        Event(
            kind="transition",
            name=f"wave_{event}",
            rollout_id=wave.rollout_id,
            wave_id=wave.id,
            from_state=str(old),
            to_state=str(new),
            detail=detail,
            created_at=now,
        )
    )
    return new
