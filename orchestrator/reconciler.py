"""Periodic repair from SQL, the source of truth (Celery beat runs ``fleet.reconcile``).

- starts scheduled rollouts whose ``start_at`` has come;
- times out device updates past their stage deadline and resumes their parked chain (the claim is
  the same atomic one ingest uses, so exactly one of "report arrived" and "timed out" wins);
- repairs what a lost canvas leaves behind (e.g. Redis flushed): re-syncs in-flight slots, resumes
  updates whose continuation vanished, closes waves whose devices all ended.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta

from celery import chain
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from orchestrator.models import DeviceUpdate, Rollout, Wave, utcnow
from orchestrator.services.rollout_engine import close_wave, device_chain, kick_rollout, policy_of
from orchestrator.services.rollout_service import start_rollout
from orchestrator.state_machines import (
    UPDATE_END_STATES,
    UPDATE_IN_FLIGHT,
    RolloutState,
    UpdateEvent,
    UpdateState,
    WaveState,
)
from orchestrator.transitions import transition_update
from orchestrator.worker.continuations import Stage
from orchestrator.worker.runtime import Runtime

log = logging.getLogger(__name__)
# How long a step may look stuck before the reconciler assumes its continuation was lost.
LOST_AFTER = timedelta(seconds=30)
WAVE_CLOSE_GRACE = timedelta(seconds=10)
BATCH = 1000


def reconcile_once(rt: Runtime) -> dict[str, int]:
    """One pass over everything that may need repair; safe to run concurrently with the engine."""
    stats: Counter[str] = Counter()
    _start_due(rt, stats)
    _time_out(rt, stats)
    _repair_running(rt, stats)
    if stats:
        log.info("reconcile: %s", dict(stats))
    return dict(stats)


def _start_due(rt: Runtime, stats: Counter[str]) -> None:
    with rt.sessions() as session:
        due = session.scalars(
            select(Rollout.id).where(
                Rollout.status == RolloutState.SCHEDULED,
                Rollout.start_at.is_not(None),
                Rollout.start_at <= utcnow(),
            )
        ).all()
        for rollout_id in due:
            try:
                start_rollout(session, rollout_id, actor="scheduler", send=False)
            except StaleDataError:
                session.rollback()
                continue
            kick_rollout(rt, rollout_id)
            stats["started"] += 1


def _time_out(rt: Runtime, stats: Counter[str]) -> None:
    with rt.sessions() as session:
        expired = session.scalars(
            select(DeviceUpdate)
            .where(DeviceUpdate.state.in_(UPDATE_IN_FLIGHT), DeviceUpdate.deadline_at < utcnow())
            .limit(BATCH)
        ).all()
        policies: dict[int, int] = {}
        for du in expired:
            if du.rollout_id not in policies:
                policies[du.rollout_id] = policy_of(session.get_one(Rollout, du.rollout_id)).max_attempts
            event = UpdateEvent.TIMEOUT_RETRY if du.attempt < policies[du.rollout_id] else UpdateEvent.TIMEOUT
            stage_state = str(du.state)
            try:
                transition_update(
                    session, du, event, error_code="timeout", detail={"stage_state": stage_state}
                )
                session.commit()
            except StaleDataError:
                session.rollback()  # a report moved it on first: that one wins
                stats["timeout_lost_race"] += 1
                continue
            stats["timed_out"] += 1
            rt.store.mark_dirty(du.rollout_id)
            claimed = rt.store.claim_many([(du.id, du.attempt, "verified"), (du.id, du.attempt, "done")])
            for _update_id, chain in claimed:
                rt.store.resume(chain)
            if not claimed and du.state == UpdateState.RETRYING:
                device_chain(du.id).apply_async()  # the chain was lost; start the retry afresh
                stats["relaunched"] += 1


def _repair_running(rt: Runtime, stats: Counter[str]) -> None:
    now = utcnow()
    with rt.sessions() as session:
        active = session.scalars(
            select(Rollout).where(
                Rollout.status.in_([RolloutState.RUNNING, RolloutState.ABORTED, RolloutState.HALTED])
            )
        ).all()
        for rollout in active:
            running_waves = session.scalars(
                select(Wave).where(Wave.rollout_id == rollout.id, Wave.status == WaveState.RUNNING)
            ).all()
            if rollout.status != RolloutState.RUNNING and not running_waves:
                continue
            if rollout.status == RolloutState.RUNNING and not running_waves:
                try:
                    kick_rollout(rt, rollout.id)  # a lost kick: launch the next wave or complete
                    stats["kicked"] += 1
                except StaleDataError:
                    stats["kick_lost_race"] += 1  # a worker launched it at the same moment
                continue
            in_flight = session.scalars(
                select(DeviceUpdate.id).where(
                    DeviceUpdate.rollout_id == rollout.id, DeviceUpdate.state.in_(UPDATE_IN_FLIGHT)
                )
            ).all()
            rt.store.sync_slots(rollout.id, in_flight)
            _resume_lost(rt, session, rollout.id, stats)
            for wave in running_waves:
                open_count, last_end = session.execute(
                    select(
                        func.count().filter(DeviceUpdate.state.not_in(UPDATE_END_STATES)),
                        func.max(DeviceUpdate.finished_at),
                    ).where(DeviceUpdate.wave_id == wave.id)
                ).one()
                # With tasks still queued the chord closes the wave itself, after every finalize.
                lost_chord = open_count == 0 and (last_end is None or last_end < now - WAVE_CLOSE_GRACE)
                if lost_chord and _broker_idle(rt):
                    stats["waves_closed"] += 1
                    close_wave(rt, wave.id)
            if rollout.status == RolloutState.RUNNING:
                free = policy_of(rollout).max_in_flight - rt.store.slots_in_use(rollout.id)
                if free > 0 and rt.store.waiting_count(rollout.id):
                    stats["released"] += rt.store.release_waiting(rollout.id, free)
            elif rt.store.waiting_count(rollout.id):
                stats["released"] += rt.store.release_waiting(rollout.id, 10**9)


def _broker_idle(rt: Runtime) -> bool:
    """No task waits in the Celery queue or sits unacknowledged at a worker (kombu's Redis layout)."""
    return int(rt.redis.llen("celery")) == 0 and int(rt.redis.hlen("unacked")) == 0


def _resume_lost(rt: Runtime, session: Session, rollout_id: int, stats: Counter[str]) -> None:
    """Updates idle for LOST_AFTER with no continuation waiting for them get a fresh chain.

    The step that moves an update on may simply still wait in the queue, so an update counts as lost
    only while the broker holds no task at all. A parked slot wait that fell out of its queue is put
    back instead.
    """
    from orchestrator.worker import tasks

    idle_states = [UpdateState.RETRYING, UpdateState.VERIFIED, UpdateState.QUEUED]
    broker_idle = _broker_idle(rt)
    idle = session.execute(
        select(DeviceUpdate.id, DeviceUpdate.state, DeviceUpdate.attempt)
        .where(
            DeviceUpdate.rollout_id == rollout_id,
            DeviceUpdate.state.in_(idle_states),
            DeviceUpdate.updated_at < utcnow() - LOST_AFTER,
        )
        .limit(BATCH)
    ).tuples()
    for update_id, state, attempt in idle:
        if state == UpdateState.QUEUED and rt.store.is_parked(update_id, attempt, "slot"):
            if rt.store.ensure_waiting(rollout_id, update_id, attempt):
                stats["requeued_waits"] += 1
            continue
        stages: tuple[Stage, ...] = ("slot",) if state == UpdateState.QUEUED else ("verified", "done", "slot")
        if any(rt.store.is_parked(update_id, attempt, stage) for stage in stages):
            continue
        if not broker_idle:
            continue  # the step that moves it on may still wait in the queue
        if state == UpdateState.VERIFIED:
            chain(tasks.install.si(update_id), tasks.finalize.si(update_id)).apply_async()
        else:
            device_chain(update_id).apply_async()
        stats["relaunched"] += 1
