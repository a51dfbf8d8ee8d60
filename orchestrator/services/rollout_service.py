"""Operator actions on rollouts: start, pause, resume, abort. Thin callers (API, CLI) use only these.

Each action is a state-machine transition committed in SQL, then a nudge to the workers
(:func:`orchestrator.engine.client.nudge`) that admits devices or starts the next wave. Devices that
have been offered an update are never touched here: they run to an end state.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from orchestrator.engine.client import nudge
from orchestrator.engine.waves import stop_rollout
from orchestrator.errors import NotFound
from orchestrator.models import Rollout
from orchestrator.state_machines import RolloutEvent, RolloutState
from orchestrator.transitions import transition_rollout

log = logging.getLogger(__name__)


def get_rollout(session: Session, rollout_id: int) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"rollout {rollout_id} does not exist", field="rollout_id")
    return rollout


def start_rollout(session: Session, rollout_id: int, *, actor: str = "system", send: bool = True) -> Rollout:
    """SCHEDULED -> RUNNING and launch the first wave. Rollout must be SCHEDULED. Commits."""
    rollout = get_rollout(session, rollout_id)
    transition_rollout(session, rollout, RolloutEvent.START, actor=actor)
    session.commit()
    if send:
        nudge(rollout_id)
    return rollout


def pause_rollout(session: Session, rollout_id: int, *, actor: str = "operator") -> Rollout:
    """RUNNING -> PAUSED: no new device starts; devices already offered finish. Commits."""
    rollout = get_rollout(session, rollout_id)
    transition_rollout(session, rollout, RolloutEvent.PAUSE, actor=actor)
    session.commit()
    nudge(rollout_id)  # refreshes the portal summary
    return rollout


def resume_rollout(session: Session, rollout_id: int, *, actor: str = "operator") -> Rollout:
    """PAUSED -> RUNNING and release waiting devices. Rollout must be PAUSED. Commits."""
    rollout = get_rollout(session, rollout_id)
    transition_rollout(session, rollout, RolloutEvent.RESUME, actor=actor)
    session.commit()
    nudge(rollout_id)
    return rollout


def abort_rollout(session: Session, rollout_id: int, *, actor: str = "operator") -> Rollout:
    """Stop for good: PENDING/QUEUED updates become CANCELED, started ones finish. Commits."""
    rollout = get_rollout(session, rollout_id)
    canceled = stop_rollout(session, rollout, RolloutEvent.ABORT, reason="aborted by operator", actor=actor)
    session.commit()
    log.info("rollout %s aborted: %d device updates canceled", rollout_id, len(canceled))
    nudge(rollout_id)
    return rollout


def is_active(rollout: Rollout) -> bool:
    return rollout.status in (RolloutState.RUNNING, RolloutState.PAUSED)
