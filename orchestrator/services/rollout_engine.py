"""Wave-level flow of a running rollout; runs inside Celery workers.

A wave is ``chord(group(offer | install | finalize per device), close_wave)``. ``close_wave`` checks
the success gate and launches the next wave from fresh SQL state. All functions are idempotent:
the reconciler may call them again after a lost canvas.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery import chain, chord
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.models import DeviceUpdate, Rollout, Wave
from orchestrator.services.policy import RolloutPolicy
from orchestrator.services.rollout_service import stop_rollout
from orchestrator.state_machines import (
    UPDATE_END_STATES,
    UPDATE_FAILURE_STATES,
    RolloutEvent,
    RolloutState,
    UpdateEvent,
    UpdateState,
    WaveEvent,
    WaveState,
)
from orchestrator.transitions import bulk_transition_updates, transition_rollout, transition_wave
from orchestrator.worker.runtime import Runtime

log = logging.getLogger(__name__)
# Percent failure thresholds only apply once this many devices of the rollout have finished.
MIN_FINISHED_FOR_PERCENT = 10


_policies: dict[tuple[int, datetime], RolloutPolicy] = {}


def policy_of(rollout: Rollout) -> RolloutPolicy:
    """The rollout's policy, parsed once per process (a policy never changes after creation)."""
    key = (rollout.id, rollout.created_at)
    policy = _policies.get(key)
    if policy is None:
        if len(_policies) > 10_000:
            _policies.clear()
        policy = _policies[key] = RolloutPolicy.model_validate(rollout.policy)
    return policy


def device_chain(update_id: int) -> Any:
    from orchestrator.worker import tasks

    return chain(tasks.offer.si(update_id), tasks.install.si(update_id), tasks.finalize.si(update_id))


def launch_wave(rt: Runtime, session: Session, rollout: Rollout, wave: Wave) -> int:
    """PENDING wave -> RUNNING, its updates QUEUED, and its chord sent. Commits; returns device count."""
    from orchestrator.worker import tasks

    transition_wave(session, wave, WaveEvent.START)
    rollout.current_wave = wave.index
    pending = session.execute(
        select(DeviceUpdate.id, DeviceUpdate.version, DeviceUpdate.state).where(
            DeviceUpdate.wave_id == wave.id, DeviceUpdate.state == UpdateState.PENDING
        )
    ).tuples()
    queued = bulk_transition_updates(session, list(pending), UpdateEvent.ENQUEUE)
    session.commit()
    rt.store.mark_dirty(rollout.id)
    if not queued:
        tasks.close_wave.delay(wave.id)
        return 0
    chord([device_chain(i) for i in sorted(queued)], tasks.close_wave.si(wave.id)).apply_async()
    log.info("rollout %s wave %s launched with %d devices", rollout.id, wave.index, len(queued))
    return len(queued)


def kick_rollout(rt: Runtime, rollout_id: int) -> None:
    """Move a rollout on from its SQL state: release parked offers, start the next wave, or complete."""
    with rt.sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            return
        rt.store.mark_dirty(rollout_id)
        if rollout.status in (RolloutState.ABORTED, RolloutState.HALTED):
            # Parked offers wake up, see their update CANCELED and end their chains.
            rt.store.release_waiting(rollout_id, limit=10**9)
            return
        if rollout.status != RolloutState.RUNNING:
            return
        policy = policy_of(rollout)
        waves = list(session.scalars(select(Wave).where(Wave.rollout_id == rollout_id).order_by(Wave.index)))
        if any(w.status == WaveState.RUNNING for w in waves):
            free = policy.max_in_flight - rt.store.slots_in_use(rollout_id)
            if free > 0:
                rt.store.release_waiting(rollout_id, free)
            return
        if any(w.status == WaveState.FAILED for w in waves):
            return  # close_wave halts the rollout; nothing more starts
        next_wave = next((w for w in waves if w.status == WaveState.PENDING), None)
        if next_wave is not None:
            launch_wave(rt, session, rollout, next_wave)
            return
        transition_rollout(session, rollout, RolloutEvent.COMPLETE)
        session.commit()
        rt.store.mark_dirty(rollout_id)  # after the commit, so the portal never shows a stale end
        log.info("rollout %s completed", rollout_id)


def wave_counts(session: Session, wave_id: int) -> dict[UpdateState, int]:
    rows = session.execute(
        select(DeviceUpdate.state, func.count())
        .where(DeviceUpdate.wave_id == wave_id)
        .group_by(DeviceUpdate.state)
    )
    return {UpdateState(state): count for state, count in rows}


def close_wave(rt: Runtime, wave_id: int) -> str | None:
    """Evaluate a finished wave against its gate and move the rollout on. No-op unless RUNNING and done."""
    with rt.sessions() as session:
        wave = session.get(Wave, wave_id)
        if wave is None or wave.status != WaveState.RUNNING:
            return None
        counts = wave_counts(session, wave_id)
        if any(state not in UPDATE_END_STATES for state in counts):
            # Some chain was resumed outside the chord (reconciler); the reconciler closes it later.
            log.info("wave %s not finished yet: %s", wave_id, counts)
            return None
        rollout = session.get_one(Rollout, wave.rollout_id)
        policy = policy_of(rollout)
        succeeded = counts.get(UpdateState.SUCCEEDED, 0)
        finished = sum(n for s, n in counts.items() if s not in (UpdateState.SKIPPED, UpdateState.CANCELED))
        passed = finished == 0 or succeeded / finished >= policy.success_threshold
        detail = {"succeeded": succeeded, "finished": finished, "threshold": policy.success_threshold}
        transition_wave(session, wave, WaveEvent.PASS if passed else WaveEvent.FAIL, detail=detail)
        if not passed and rollout.status in (RolloutState.RUNNING, RolloutState.PAUSED):
            reason = f"wave {wave.index} below success threshold ({succeeded}/{finished})"
            stop_rollout(session, rollout, RolloutEvent.HALT, reason=reason, actor="system")
        session.commit()
        result = str(wave.status)
    rt.store.mark_dirty(wave.rollout_id)
    kick_rollout(rt, wave.rollout_id)
    return result


def failure_threshold_reached(session: Session, rollout: Rollout) -> str | None:
    """The reason to halt, if the rollout's failures exceed its policy; else None."""
    policy = policy_of(rollout)
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
    kick_rollout(rt, rollout_id)
    return True
