"""Applies state-machine events to rows and records them as Events.

This is the only module that assigns ``state``/``status``. Single-row changes go through the ORM
(optimistic ``version`` check raises ``StaleDataError`` on a concurrent writer); bulk changes are
compare-and-set UPDATEs that only touch rows still in the expected state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, String, bindparam, case, func, insert, select, update
from sqlalchemy.orm import Session

from orchestrator.audit import record
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
    reports of one device; none for a progress-only change); the path is re-validated against the
    table before writing. ``error_code`` None keeps the row's; ``set_deadline`` writes ``deadline_at``.
    """

    du_id: int
    expected_version: int
    old: UpdateState
    events: tuple[UpdateEvent, ...]
    new: UpdateState
    progress: int
    last_seq: int | None
    error_code: str | None = None
    deadline_at: datetime | None = None
    set_deadline: bool = False


_T = DeviceUpdate.__table__.c
# One statement for every shape of change, so a batch is a single executemany.
_CAS = (
    update(DeviceUpdate.__table__)  # type: ignore[arg-type]
    .where(_T.id == bindparam("b_id"), _T.version == bindparam("b_old_version"))
    .values(
        state=bindparam("b_state"),
        version=bindparam("b_new_version"),
        progress=bindparam("b_progress"),
        last_seq=bindparam("b_last_seq"),
        updated_at=bindparam("b_now"),
        redrive_at=None,
        error_code=func.coalesce(bindparam("b_error", type_=String), _T.error_code),
        deadline_at=case(
            (bindparam("b_set_deadline", type_=Boolean), bindparam("b_deadline", type_=_T.deadline_at.type)),
            else_=_T.deadline_at,
        ),
        finished_at=case(
            (bindparam("b_finished", type_=Boolean), bindparam("b_now2", type_=_T.finished_at.type)),
            else_=_T.finished_at,
        ),
    )
)


def _validate(change: RowChange) -> None:
    state = change.old
    for event in change.events:
        state = next_update_state(state, event, entity_id=change.du_id)
    if state != change.new:
        raise ValueError(f"update {change.du_id}: events lead to {state}, not {change.new}")


def apply_row_changes(session: Session, changes: Sequence[RowChange]) -> set[int]:
    """Compare-and-set many rows on their versions in one executemany; returns the ids another
    writer changed first (left alone). The caller inserts the matching Event rows."""
    if not changes:
        return set()
    for change in changes:
        _validate(change)
    now = utcnow()
    params = []
    for c in changes:
        ended = c.new in UPDATE_END_STATES
        params.append(
            {
                "b_id": c.du_id,
                "b_old_version": c.expected_version,
                "b_new_version": c.expected_version + 1,
                "b_state": c.new,
                "b_progress": 100 if c.new == UpdateState.SUCCEEDED else c.progress,
                "b_last_seq": c.last_seq,
                "b_now": now,
                "b_error": c.error_code,
                "b_set_deadline": c.set_deadline or ended,
                "b_deadline": None if ended else c.deadline_at,
                "b_finished": ended,
                "b_now2": now,
            }
        )
    connection = session.connection()
    result = connection.execute(_CAS, params)
    if result.rowcount == len(params) and (
        len(params) == 1 or connection.dialect.supports_sane_multi_rowcount
    ):
        return set()
    # Some rows moved meanwhile: ours carry this call's exact updated_at, the others do not.
    ids = [c.du_id for c in changes]
    ours = {
        row_id
        for row_id, updated_at in connection.execute(select(_T.id, _T.updated_at).where(_T.id.in_(ids)))
        if updated_at == now
    }
    return set(ids) - ours


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
    if event in (UpdateEvent.REQUEUE, UpdateEvent.RETRY_BY_OPERATOR):
        changes.update(attempt=DeviceUpdate.attempt + 1, progress=0, error_code=None)
    if event == UpdateEvent.RETRY_BY_OPERATOR:
        changes.update(finished_at=None, finalized_at=None, deadline_at=None, stop_requested_at=None)
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


_AUDITED_ROLLOUT_EVENTS = frozenset(
    {RolloutEvent.START, RolloutEvent.PAUSE, RolloutEvent.RESUME, RolloutEvent.HALT, RolloutEvent.ABORT}
)


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
    if not actor.startswith("api:") and event in _AUDITED_ROLLOUT_EVENTS:
        # API calls are audited by the API itself; this records the engine's and the scheduler's.
        record(
            session,
            actor=actor,
            action=f"rollout.{event}",
            target_kind="rollout",
            target_id=rollout.id,
            detail={"reason": reason} if reason else None,
        )
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
