"""Rollout- and wave-level flow: start the next wave, close a finished one, halt, complete.

A wave is a barrier in SQL: it closes once none of its device updates is open. Whoever ends the
last one (the finalize step, or the reconciler) calls :func:`close_wave`, which checks the success
gate and starts the next wave from fresh SQL state. Every function here is idempotent: a wave or
rollout that has already moved on is left alone, and concurrent callers meet on optimistic version
checks.
"""

from __future__ import annotations

import logging

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from orchestrator.aws_jobs import PROTOCOL as AWS_PROTOCOL
from orchestrator.engine.runtime import Runtime
from orchestrator.models import Device, DeviceUpdate, JobExecution, Rollout, Wave, utcnow
from orchestrator.policy import RolloutPolicy, policy_of
from orchestrator.protocol import ErrorCode
from orchestrator.state_machines import (
    UPDATE_END_STATES,
    UPDATE_FAILURE_STATES,
    UPDATE_NOT_STARTED,
    RolloutEvent,
    RolloutState,
    UpdateEvent,
    UpdateState,
    WaveEvent,
    WaveState,
)
from orchestrator.transitions import bulk_transition_where, transition_rollout, transition_wave

log = logging.getLogger(__name__)
# Percent failure thresholds only apply once this many devices of the rollout have finished.
MIN_FINISHED_FOR_PERCENT = 10


def rollout_policy(rollout: Rollout) -> RolloutPolicy:
    return policy_of(rollout.id, rollout.created_at, rollout.policy)


# ------------------------------------------------------------------ stopping
def cancel_not_started(
    session: Session, *criteria: object, error_code: str, detail: dict[str, object] | None = None
) -> list[int]:
    """PENDING/QUEUED updates matching ``criteria`` become CANCELED (finalized at once: nothing was
    offered). Returns their ids. The caller commits."""
    now = utcnow()
    canceled: list[int] = []
    for state in sorted(UPDATE_NOT_STARTED):
        moved = bulk_transition_where(
            session,
            UpdateEvent.CANCEL,
            state,
            *criteria,
            values={"finalized_at": now},
            error_code=error_code,
            detail=detail,
        )
        canceled.extend(row.id for row in moved)
    return canceled


def cancel_unstarted_jobs(session: Session, *criteria: object, error_code: str) -> list[int]:
    """OFFERED updates (matching ``criteria``) of AWS Jobs devices that never started their
    execution become CANCELED, as
    AWS cancels QUEUED executions. The state and the absence of a start are the compare-and-set:
    ingest records the start and moves the update on in one transaction, so a device either
    started first (its update finishes) or finds nothing to start. The caller commits."""
    started = exists().where(
        JobExecution.device_update_id == DeviceUpdate.id,
        JobExecution.execution_number == DeviceUpdate.attempt,
        JobExecution.started_at.is_not(None),
    )
    moved = bulk_transition_where(
        session,
        UpdateEvent.JOB_CANCELED,
        UpdateState.OFFERED,
        *criteria,
        DeviceUpdate.device_id.in_(select(Device.id).where(Device.protocol == AWS_PROTOCOL)),
        ~started,
        error_code=error_code,
    )
    return [row.id for row in moved]


def stop_rollout(
    session: Session, rollout: Rollout, event: RolloutEvent, *, reason: str, actor: str
) -> list[int]:
    """ABORT or HALT: cancel every device update that has not started, and every wave not begun.

    Updates already offered are not touched: they run to an end state. Returns the canceled ids.
    The caller commits.
    """
    transition_rollout(session, rollout, event, reason=reason, actor=actor)
    code = ErrorCode.CANCELED if event == RolloutEvent.ABORT else "rollout_halted"
    canceled = cancel_not_started(session, DeviceUpdate.rollout_id == rollout.id, error_code=str(code))
    canceled += cancel_unstarted_jobs(session, DeviceUpdate.rollout_id == rollout.id, error_code=str(code))
    for wave in session.scalars(
        select(Wave).where(Wave.rollout_id == rollout.id, Wave.status == WaveState.PENDING)
    ):
        transition_wave(session, wave, WaveEvent.CANCEL, detail={"reason": reason})
    return canceled


# ------------------------------------------------------------------ waves
def start_wave(session: Session, rollout: Rollout, wave: Wave) -> int:
    """PENDING wave -> RUNNING and its updates PENDING -> QUEUED, in one transaction (commits).

    Nothing is sent here: admission (the offer step) takes QUEUED updates into flight. A crash
    before the commit leaves the wave PENDING, after it a RUNNING wave whose QUEUED updates the
    reconciler's admission picks up: launching is resumable from SQL.
    """
    transition_wave(session, wave, WaveEvent.START)
    rollout.current_wave = wave.index
    moved = bulk_transition_where(
        session, UpdateEvent.ENQUEUE, UpdateState.PENDING, DeviceUpdate.wave_id == wave.id
    )
    session.commit()
    log.info("rollout %s wave %s started with %d devices", rollout.id, wave.index, len(moved))
    return len(moved)


def wave_is_open(session: Session, wave_id: int) -> bool:
    """Some update of the wave has not reached an end state."""
    return bool(
        session.scalar(
            select(
                exists().where(DeviceUpdate.wave_id == wave_id, DeviceUpdate.state.not_in(UPDATE_END_STATES))
            )
        )
    )


def wave_counts(session: Session, wave_id: int) -> dict[UpdateState, int]:
    rows = session.execute(
        select(DeviceUpdate.state, func.count())
        .where(DeviceUpdate.wave_id == wave_id)
        .group_by(DeviceUpdate.state)
    )
    return {UpdateState(state): count for state, count in rows}


def kick(rt: Runtime, rollout_id: int) -> None:
    """Move a rollout on from its SQL state: admit devices, start the next wave, or complete."""
    start_admission = False
    with rt.sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None or rollout.status != RolloutState.RUNNING:
            rt.marks.mark(rollout_id)
            return
        waves = list(session.scalars(select(Wave).where(Wave.rollout_id == rollout_id).order_by(Wave.index)))
        if any(w.status == WaveState.RUNNING for w in waves):
            start_admission = True
        elif any(w.status == WaveState.FAILED for w in waves):
            pass  # close_wave halts the rollout; nothing more starts
        elif (next_wave := next((w for w in waves if w.status == WaveState.PENDING), None)) is not None:
            if start_wave(session, rollout, next_wave) == 0 and not wave_is_open(session, next_wave.id):
                rt.marks.mark(rollout_id)
                close_wave(rt, next_wave.id)
                return
            start_admission = True
        else:
            transition_rollout(session, rollout, RolloutEvent.COMPLETE)
            session.commit()
            log.info("rollout %s completed", rollout_id)
    rt.marks.mark(rollout_id)  # after the commit, so the portal never shows a stale end
    if start_admission:
        from orchestrator.engine.admission import admit

        admit(rt, rollout_id)


def close_wave(rt: Runtime, wave_id: int) -> str | None:
    """Evaluate a finished wave against its gate and move the rollout on. No-op unless RUNNING and done."""
    with rt.sessions() as session:
        wave = session.get(Wave, wave_id)
        if wave is None or wave.status != WaveState.RUNNING or wave_is_open(session, wave_id):
            return None
        rollout = session.get_one(Rollout, wave.rollout_id)
        from orchestrator.engine.lifetime import holds_last_wave_open

        if holds_last_wave_open(session, rollout, wave):
            return None
        counts = wave_counts(session, wave_id)
        policy = rollout_policy(rollout)
        succeeded = counts.get(UpdateState.SUCCEEDED, 0)
        finished = sum(n for s, n in counts.items() if s not in (UpdateState.SKIPPED, UpdateState.CANCELED))
        passed = finished == 0 or succeeded / finished >= policy.success_threshold
        detail = {"succeeded": succeeded, "finished": finished, "threshold": policy.success_threshold}
        transition_wave(session, wave, WaveEvent.PASS if passed else WaveEvent.FAIL, detail=detail)
        if not passed and rollout.status in (RolloutState.RUNNING, RolloutState.PAUSED):
            reason = f"wave {wave.index} below success threshold ({succeeded}/{finished})"
            stop_rollout(session, rollout, RolloutEvent.HALT, reason=reason, actor="system")
        session.commit()
        result, rollout_id = str(wave.status), wave.rollout_id
    rt.marks.mark(rollout_id)
    kick(rt, rollout_id)
    return result


# ------------------------------------------------------------------ thresholds
def failure_threshold_reached(session: Session, rollout: Rollout) -> str | None:
    """The reason to halt, if the rollout's failures exceed its policy; else None."""
    policy = rollout_policy(rollout)
    if policy.failure_threshold_count is None and policy.failure_threshold_percent is None:
        return None
    rows = session.execute(
        select(DeviceUpdate.state, func.count())
        .where(DeviceUpdate.rollout_id == rollout.id, DeviceUpdate.state.in_(UPDATE_END_STATES))
        .group_by(DeviceUpdate.state)
    )
    counts = {UpdateState(s): n for s, n in rows}
    failed = sum(counts.get(s, 0) for s in UPDATE_FAILURE_STATES)
    finished = failed + counts.get(UpdateState.SUCCEEDED, 0)
    if policy.failure_threshold_count is not None and failed >= policy.failure_threshold_count:
        return f"{failed} failed devices reached the failure threshold of {policy.failure_threshold_count}"
    percent = policy.failure_threshold_percent
    if percent is not None and finished >= MIN_FINISHED_FOR_PERCENT and 100.0 * failed / finished >= percent:
        return f"{failed} of {finished} finished devices failed (threshold {percent}%)"
    return None


def halt_if_threshold_reached(rt: Runtime, rollout_id: int) -> bool:
    """Halt a RUNNING/PAUSED rollout whose failures crossed the threshold. Returns True if halted now."""
    with rt.sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None or rollout.status not in (RolloutState.RUNNING, RolloutState.PAUSED):
            return False
        reason = failure_threshold_reached(session, rollout)
        if reason is None:
            return False
        stop_rollout(session, rollout, RolloutEvent.HALT, reason=reason, actor="system")
        session.commit()
    log.warning("rollout %s halted: %s", rollout_id, reason)
    rt.marks.mark(rollout_id)
    return True
