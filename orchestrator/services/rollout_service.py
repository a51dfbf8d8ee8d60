"""Operator actions on rollouts: start, pause, resume, abort. Thin callers (API, CLI) use only these.

Each action is a state-machine transition committed in SQL, then a nudge to the workers
(``fleet.kick_rollout``) that releases parked offers or starts the next wave. Devices that have
been offered an update are never touched here: they run to an end state.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.errors import NotFound
from orchestrator.models import DeviceUpdate, Rollout, Wave
from orchestrator.protocol import ErrorCode
from orchestrator.state_machines import (
    UPDATE_NOT_STARTED,
    RolloutEvent,
    RolloutState,
    UpdateEvent,
    WaveEvent,
    WaveState,
)
from orchestrator.transitions import bulk_transition_updates, transition_rollout, transition_wave

log = logging.getLogger(__name__)


def get_rollout(session: Session, rollout_id: int) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"rollout {rollout_id} does not exist", field="rollout_id")
    return rollout


def _send(task: str, rollout_id: int) -> None:
    """Nudge the workers. The state change is already committed, so a broker outage only delays it:
    the reconciler moves every RUNNING rollout on from SQL."""
    from orchestrator.worker.celery_app import app

    try:
        app.send_task(task, args=(rollout_id,), retry=False)
    except Exception as exc:
        log.warning(
            "could not send %s for rollout %s (%s); the reconciler will pick it up", task, rollout_id, exc
        )


def start_rollout(session: Session, rollout_id: int, *, actor: str = "system", send: bool = True) -> Rollout:
    """SCHEDULED -> RUNNING and launch the first wave. Rollout must be SCHEDULED. Commits."""
    rollout = get_rollout(session, rollout_id)
    transition_rollout(session, rollout, RolloutEvent.START, actor=actor)
    session.commit()
    if send:
        _send("fleet.kick_rollout", rollout_id)
    return rollout


def pause_rollout(session: Session, rollout_id: int, *, actor: str = "operator") -> Rollout:
    """RUNNING -> PAUSED: no new device starts; devices already offered finish. Commits."""
    rollout = get_rollout(session, rollout_id)
    transition_rollout(session, rollout, RolloutEvent.PAUSE, actor=actor)
    session.commit()
    _send("fleet.publish_summary", rollout_id)
    return rollout


def resume_rollout(session: Session, rollout_id: int, *, actor: str = "operator") -> Rollout:
    """PAUSED -> RUNNING and release waiting devices. Rollout must be PAUSED. Commits."""
    rollout = get_rollout(session, rollout_id)
    transition_rollout(session, rollout, RolloutEvent.RESUME, actor=actor)
    session.commit()
    _send("fleet.kick_rollout", rollout_id)
    return rollout


def stop_rollout(
    session: Session, rollout: Rollout, event: RolloutEvent, *, reason: str, actor: str
) -> list[int]:
    """ABORT or HALT: cancel every device update that has not started, and every wave not begun.

    Returns the canceled update ids. The caller commits and kicks the rollout so parked chains end.
    """
    transition_rollout(session, rollout, event, reason=reason, actor=actor)
    not_started = session.scalars(
        select(DeviceUpdate).where(
            DeviceUpdate.rollout_id == rollout.id, DeviceUpdate.state.in_(UPDATE_NOT_STARTED)
        )
    ).all()
    code = ErrorCode.CANCELED if event == RolloutEvent.ABORT else "rollout_halted"
    canceled = bulk_transition_updates(session, not_started, UpdateEvent.CANCEL, error_code=str(code))
    for wave in session.scalars(
        select(Wave).where(Wave.rollout_id == rollout.id, Wave.status == WaveState.PENDING)
    ):
        transition_wave(session, wave, WaveEvent.CANCEL, detail={"reason": reason})
    return canceled


def abort_rollout(session: Session, rollout_id: int, *, actor: str = "operator") -> Rollout:
    """Stop for good: PENDING/QUEUED updates become CANCELED, started ones finish. Commits."""
    rollout = get_rollout(session, rollout_id)
    canceled = stop_rollout(session, rollout, RolloutEvent.ABORT, reason="aborted by operator", actor=actor)
    session.commit()
    log.info("rollout %s aborted: %d device updates canceled", rollout_id, len(canceled))
    _send("fleet.kick_rollout", rollout_id)
    return rollout


def is_active(rollout: Rollout) -> bool:
    return rollout.status in (RolloutState.RUNNING, RolloutState.PAUSED)
