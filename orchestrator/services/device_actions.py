"""Operator actions on one device's update inside a rollout: retry, cancel, request a stop.

* **retry** a FAILED or TIMED_OUT update: a new attempt (``attempt + 1``) queued in the same
  rollout, offered through admission like any other (slots, rate, windows). Only while the rollout
  runs or is paused, and only for failures before the install step: a device never installs the
  same update twice, so a retried install failure would only answer with the same result.
* **cancel** an update not offered yet (PENDING or QUEUED): CANCELED at once.
* **stop** an update offered but not installing (OFFERED … VERIFIED): the device gets stage
  ``cancel``, drops the download and reports CANCELED; no install stage goes out after the
  request. One already installing is refused (non-interruptible); a device that began installing
  before the request reached it finishes, and its update ends as the install does.

Each is a compare-and-set on the row's state, so a device report moving the row meanwhile makes
the action a 409 instead of a lost update. The caller commits nothing: these commit.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from orchestrator.aws_jobs import PROTOCOL as AWS_PROTOCOL
from orchestrator.engine.waves import cancel_unstarted_jobs
from orchestrator.errors import Conflict, NotFound
from orchestrator.models import Device, DeviceUpdate, Event, Rollout, Wave, utcnow
from orchestrator.protocol import ErrorCode
from orchestrator.state_machines import (
    UPDATE_NOT_STARTED,
    UPDATE_STOPPABLE,
    RolloutState,
    UpdateEvent,
    UpdateState,
    WaveState,
)
from orchestrator.transitions import bulk_transition_where

# Install-stage outcomes: the device would answer a new attempt with the same result.
NOT_RETRYABLE = frozenset(
    {
        ErrorCode.INSTALL_ERROR,
        ErrorCode.BOOT_FAILURE,
        ErrorCode.SIGNATURE,
        ErrorCode.INCOMPATIBLE,
        ErrorCode.HEALTH,
    }
)
_RETRYABLE_ROLLOUT = (RolloutState.RUNNING, RolloutState.PAUSED)
# A timeout here means the device may have installed: it would never install the update again.
_INSTALL_STEP = frozenset(
    str(s)
    for s in (UpdateState.INSTALLING, UpdateState.REBOOTING, UpdateState.SOAKING, UpdateState.ROLLING_BACK)
)


def device_update(session: Session, rollout_id: int, device_id: str) -> DeviceUpdate:
    row = session.scalar(
        select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.device_id == device_id)
    )
    if row is None:
        if session.get(Rollout, rollout_id) is None:
            raise NotFound(f"rollout {rollout_id} does not exist", field="rollout_id")
        raise NotFound(f"device {device_id} is not in rollout {rollout_id}", field="device_id")
    return row


def _note(session: Session, row: DeviceUpdate, name: str, actor: str, **detail: object) -> None:
    session.add(
        Event(
            kind="operator",
            name=name,
            rollout_id=row.rollout_id,
            wave_id=row.wave_id,
            device_update_id=row.id,
            device_id=row.device_id,
            attempt=row.attempt,
            detail={"actor": actor, **detail},
            created_at=utcnow(),
        )
    )


def retry_update(
    session: Session, rollout_id: int, device_id: str, *, actor: str = "operator"
) -> DeviceUpdate:
    """FAILED/TIMED_OUT -> QUEUED as a new attempt. Rollout must be RUNNING or PAUSED. Commits."""
    row = device_update(session, rollout_id, device_id)
    status = session.scalar(select(Rollout.status).where(Rollout.id == rollout_id))
    if row.state not in (UpdateState.FAILED, UpdateState.TIMED_OUT):
        raise Conflict(
            f"device {device_id} is {row.state} in rollout {rollout_id}: "
            "only FAILED or TIMED_OUT updates can be retried",
            field="device_id",
        )
    ended_from = session.scalar(
        select(Event.from_state)
        .where(Event.device_update_id == row.id, Event.to_state == str(row.state))
        .order_by(Event.id.desc())
        .limit(1)
    )
    if row.error_code in NOT_RETRYABLE or ended_from in _INSTALL_STEP:
        raise Conflict(
            f"device {device_id} ended at the install step ({row.error_code}, from {ended_from}) and never "
            "installs an update twice; create a new rollout for it with a new image",
            field="device_id",
        )
    if status not in _RETRYABLE_ROLLOUT:
        raise Conflict(
            f"rollout {rollout_id} is {status}: a retry needs a running or paused rollout; "
            "create a new rollout for this device",
            field="rollout_id",
        )
    # The new attempt joins the wave now running (or the next one), so it counts in a gate that is
    # still open; with every wave closed there is nothing left to join.
    waves = list(session.scalars(select(Wave).where(Wave.rollout_id == rollout_id).order_by(Wave.index)))
    target = next((w for w in waves if w.status == WaveState.RUNNING), None) or next(
        (w for w in waves if w.status == WaveState.PENDING), None
    )
    if target is None:
        raise Conflict(
            f"every wave of rollout {rollout_id} has closed; create a new rollout for this device",
            field="rollout_id",
        )
    moved = bulk_transition_where(
        session,
        UpdateEvent.RETRY_BY_OPERATOR,
        UpdateState(row.state),
        DeviceUpdate.id == row.id,
        values={"wave_id": target.id},
        detail={"actor": actor, "previous_error": row.error_code, "wave": target.index},
    )
    if moved and target.id != row.wave_id:
        target.size += 1
    if not moved:
        session.rollback()
        raise Conflict(f"device {device_id}'s update changed meanwhile; look again", field="device_id")
    session.commit()
    session.refresh(row)
    return row


def cancel_update(
    session: Session, rollout_id: int, device_id: str, *, actor: str = "operator"
) -> DeviceUpdate:
    """PENDING/QUEUED -> CANCELED (nothing was offered, so nothing reaches the device). Commits."""
    row = device_update(session, rollout_id, device_id)
    if row.state not in UPDATE_NOT_STARTED:
        hint = "ask it to stop instead" if row.state in UPDATE_STOPPABLE else "it runs to its end"
        raise Conflict(
            f"device {device_id} is {row.state}: only updates not offered yet can be canceled; {hint}",
            field="device_id",
        )
    moved = bulk_transition_where(
        session,
        UpdateEvent.CANCEL,
        UpdateState(row.state),
        DeviceUpdate.id == row.id,
        values={"finalized_at": utcnow()},
        error_code=str(ErrorCode.CANCELED),
        detail={"actor": actor},
    )
    if not moved:
        session.rollback()
        raise Conflict(
            f"device {device_id}'s update was offered meanwhile; ask it to stop instead", field="device_id"
        )
    session.commit()
    session.refresh(row)
    return row


def _stop_aws_job(session: Session, row: DeviceUpdate, actor: str) -> DeviceUpdate:
    """An AWS Jobs device has no "drop it" message: an execution it has not started is canceled
    in SQL (it then finds nothing to start); one it has started runs to its end."""
    if row.state == UpdateState.OFFERED and cancel_unstarted_jobs(
        session, DeviceUpdate.id == row.id, error_code=str(ErrorCode.CANCELED)
    ):
        _note(session, row, "stop_requested", actor, state=str(UpdateState.OFFERED))
        session.commit()
        session.refresh(row)
        return row
    session.rollback()
    session.refresh(row)
    raise Conflict(
        f"device {row.device_id} is {row.state}: an AWS Jobs device runs a job it has started to its end",
        field="device_id",
    )


def request_stop(
    session: Session, rollout_id: int, device_id: str, *, actor: str = "operator"
) -> DeviceUpdate:
    """Ask a device offered the update, and not installing it, to drop it. Commits; the caller then
    has the stage document sent (``engine.client.send_stage``)."""
    row = device_update(session, rollout_id, device_id)
    device = session.get(Device, device_id)
    if device is not None and device.protocol == AWS_PROTOCOL:
        return _stop_aws_job(session, row, actor)
    if row.state not in UPDATE_STOPPABLE:
        if row.state in UPDATE_NOT_STARTED:
            why = "it was not offered yet: cancel it instead"
        elif row.state in (UpdateState.INSTALLING, UpdateState.REBOOTING):
            why = "it is installing, and an install is never interrupted: it finishes"
        else:
            why = "it is past the point where a stop applies"
        raise Conflict(f"device {device_id} is {row.state}: {why}", field="device_id")
    if row.stop_requested_at is None:
        now = utcnow()
        claimed = session.execute(
            update(DeviceUpdate)
            .where(DeviceUpdate.id == row.id, DeviceUpdate.state.in_(UPDATE_STOPPABLE))
            .values(stop_requested_at=now, version=DeviceUpdate.version + 1, redrive_at=None)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if claimed != 1:
            session.rollback()
            raise Conflict(f"device {device_id}'s update moved on meanwhile; look again", field="device_id")
        _note(session, row, "stop_requested", actor, state=str(row.state))
        session.commit()
        session.refresh(row)
    return row
