"""Applies state-machine events to rows and records them as Events.

This is the only module that assigns ``state``/``status``. Single-row changes go through the ORM
(optimistic ``version`` check raises ``StaleDataError`` on a concurrent writer); bulk changes are
compare-and-set UPDATEs that only touch rows still in the expected state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, update
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
    du.redrive_at = None
    if new == UpdateState.OFFERED:
        du.offered_at = now
    # A RETRYING row's deadline is when its next attempt is due.
    du.deadline_at = None if new in UPDATE_END_STATES else deadline_at
    if new in UPDATE_END_STATES:
        du.finished_at = now
    if new == UpdateState.SUCCEEDED:
        du.progress = 100
    if error_code is not None:
        du.error_code = error_code
    session.add(Event(**_event_row(du, event, old, new, detail)))
    return new


@dataclass(frozen=True, slots=True)
class RowChange:
    """A computed change of one DeviceUpdate row: from ``old`` through ``events`` to ``new``.

    ``events`` are the state-machine events applied in order (several when a batch held several
    reports of one device); the path is re-validated against the table before writing.
    """

    du_id: int
    expected_version: int
    old: UpdateState
    events: tuple[UpdateEvent, ...]
    new: UpdateState
    values: dict[str, Any]


def apply_row_change(session: Session, change: RowChange) -> bool:
    """Compare-and-set one row on its version; False when another writer got there first.

    The caller inserts the matching Event rows once the change applied.
    """
    state = change.old
    for event in change.events:
        state = next_update_state(state, event, entity_id=change.du_id)
    if state != change.new:
        raise ValueError(f"update {change.du_id}: events lead to {state}, not {change.new}")
    now = utcnow()
    values: dict[str, Any] = {
        "state": change.new,
        "version": change.expected_version + 1,
        "updated_at": now,
        "redrive_at": None,
        **change.values,
    }
    if change.new in UPDATE_END_STATES:
        values.setdefault("finished_at", now)
        values.setdefault("deadline_at", None)
    result = session.execute(
        update(DeviceUpdate)
        .where(DeviceUpdate.id == change.du_id, DeviceUpdate.version == change.expected_version)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class MovedRow:
    """A row moved by :func:`bulk_transition_where`, as it is after the change."""

    id: int
    rollout_id: int
    wave_id: int | None
    device_id: str
    attempt: int


def bulk_transition_where(
    session: Session,
    event: UpdateEvent,
    from_state: UpdateState,
    *criteria: Any,
    values: dict[str, Any] | None = None,
    error_code: str | None = None,
    detail: dict[str, Any] | None = None,
) -> list[MovedRow]:
    """Apply ``event`` to every row in ``from_state`` matching ``criteria``, in one UPDATE.

    The state in the WHERE clause is the compare-and-set: a row another writer moved meanwhile is
    left alone. Returns the rows changed (after the change) and records one Event per row. The
    caller commits.
    """
    new = next_update_state(from_state, event)
    now = utcnow()
    changes: dict[str, Any] = {
        "state": new,
        "version": DeviceUpdate.version + 1,
        "updated_at": now,
        "redrive_at": None,
        **(values or {}),
    }
    if event == UpdateEvent.REQUEUE:
        changes.update(attempt=DeviceUpdate.attempt + 1, progress=0, error_code=None)
    if new in UPDATE_END_STATES:
        changes.setdefault("finished_at", now)
        changes.setdefault("deadline_at", None)
    if new == UpdateState.SUCCEEDED:
        changes["progress"] = 100
    if error_code is not None:
        changes["error_code"] = error_code
    result = session.execute(
        update(DeviceUpdate)
        .where(DeviceUpdate.state == from_state, *criteria)
        .values(**changes)
        .returning(
            DeviceUpdate.id,
            DeviceUpdate.rollout_id,
            DeviceUpdate.wave_id,
            DeviceUpdate.device_id,
            DeviceUpdate.attempt,
        )
        .execution_options(synchronize_session=False)
    )
    moved = [MovedRow(*row) for row in result]
    if moved:
        event_detail = dict(detail or {})
        if error_code:
            event_detail["error"] = error_code
        session.execute(
            insert(Event),
            [
                {
                    "kind": "transition",
                    "name": str(event),
                    "rollout_id": row.rollout_id,
                    "wave_id": row.wave_id,
                    "device_update_id": row.id,
                    "device_id": row.device_id,
                    "from_state": str(from_state),
                    "to_state": str(new),
                    "attempt": row.attempt,
                    "detail": event_detail or None,
                    "created_at": now,
                }
                for row in moved
            ],
        )
    return moved


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
