"""Periodic repair from SQL, the source of truth (Celery beat runs ``fleet.reconcile`` every few seconds).

Each pass, every part on its own (a failure in one row or one part is logged and the pass goes on):

- starts scheduled rollouts whose ``start_at`` has come;
- ends what a rollout past its ``end_at`` never offered: SKIPPED (offline, or window_closed);
- lets devices that newly match a continuous rollout's target join its last wave;
- times out in-flight updates of online devices past their stage deadline (the download deadline
  is set at offer, the install deadline when VERIFIED is applied or for the next maintenance
  window): a retry when attempts remain, else TIMED_OUT;
- ends soaks: a SOAKING update heard from lately SUCCEEDED, a silent one ROLLING_BACK (``health``);
- requeues RETRYING updates whose backoff has passed (their deadline is the retry time);
- re-sends the step of every update that stopped moving: after ``FLEET_STALL_S`` when the next
  move is ours (OFFERED: publish the offer again; VERIFIED: install; ended but not finalized:
  finalize), after three times that while the device is busy (its stage document again, which a
  device that moved on answers with its current state: a report lost in a broker crash comes
  back). Each re-send pushes the next one out by as long as the row has been stalled, so a device
  that is merely offline or slow costs a handful of publishes, not one per pass;
- fans new state changes out to webhook endpoints and sends new and due deliveries;
- moves rollouts on: kicks RUNNING rollouts without a running wave, closes running waves with
  nothing open, admits queued devices into free slots, and marks active rollouts for a portal refresh.

Paused, halted and aborted rollouts are repaired too (timeouts, finalize, waves); only admission
waits for RUNNING. Re-sending is safe because every step is idempotent: a step sent twice finds the
row already moved on the second time, or repeats a retained publish.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from orchestrator.engine import webhook_delivery
from orchestrator.engine.admission import admit, in_flight_count
from orchestrator.engine.dispatch import DispatchFailed
from orchestrator.engine.lifetime import join_new_devices, scan_due, skip_unreached
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.steps import finalize
from orchestrator.engine.waves import close_wave, kick, rollout_policy, wave_is_open
from orchestrator.models import Device, DeviceUpdate, Rollout, Wave, utcnow
from orchestrator.policy import RolloutPolicy, policy_of
from orchestrator.protocol import ErrorCode
from orchestrator.state_machines import (
    UPDATE_END_STATES,
    UPDATE_IN_FLIGHT,
    RolloutEvent,
    RolloutState,
    UpdateEvent,
    UpdateState,
    WaveState,
)
from orchestrator.transitions import bulk_transition_where, transition_rollout

log = logging.getLogger(__name__)
BATCH = 1000
MAX_REDRIVE_GAP = timedelta(minutes=10)
_ACTIVE = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.HALTED, RolloutState.ABORTED)


def reconcile_once(rt: Runtime) -> dict[str, int]:
    """One pass over everything that may need repair; safe to run concurrently with the engine."""
    stats: Counter[str] = Counter()
    parts: list[Callable[[Runtime, Counter[str]], None]] = [
        _start_due,
        _end_due,
        _time_out,
        _end_soaks,
        _requeue_due,
        _join_continuous,
        _redrive,
        _repair_rollouts,
        _webhooks,
    ]
    for part in parts:
        try:
            part(rt, stats)
        except Exception:
            stats["errors"] += 1
            log.exception("reconcile: %s failed; the next pass tries again", part.__name__)
    interesting = {k: v for k, v in stats.items() if k != "rollouts_checked"}
    if interesting:
        log.info("reconcile: %s", dict(stats))
    return dict(stats)


def _each(stats: Counter[str], what: str, ids: list[int], fn: Callable[[int], object]) -> None:
    for item in ids:
        try:
            fn(item)
        except Exception as exc:
            stats[f"{what}_errors"] += 1
            log.warning("reconcile: %s %s failed (%s); next pass", what, item, exc)


def _start_due(rt: Runtime, stats: Counter[str]) -> None:
    with rt.sessions() as session:
        due = list(
            session.scalars(
                select(Rollout.id).where(
                    Rollout.status == RolloutState.SCHEDULED,
                    Rollout.start_at.is_not(None),
                    Rollout.start_at <= utcnow(),
                )
            )
        )

    def start(rollout_id: int) -> None:
        with rt.sessions() as session:
            rollout = session.get_one(Rollout, rollout_id)
            if rollout.status != RolloutState.SCHEDULED:
                return
            transition_rollout(session, rollout, RolloutEvent.START, actor="scheduler")
            session.commit()
        stats["started"] += 1
        kick(rt, rollout_id)

    _each(stats, "start", due, start)


def _policies(rt: Runtime, stats: Counter[str], *statuses: RolloutState) -> list[tuple[int, RolloutPolicy]]:
    """Policies of the rollouts in ``statuses``; one that does not parse is counted and left out."""
    with rt.sessions() as session:
        rows = session.execute(
            select(Rollout.id, Rollout.created_at, Rollout.policy).where(Rollout.status.in_(statuses))
        ).all()
    parsed: list[tuple[int, RolloutPolicy]] = []
    for rollout_id, created_at, doc in rows:
        try:
            parsed.append((rollout_id, policy_of(rollout_id, created_at, doc)))
        except ValueError as exc:
            stats["policy_errors"] += 1
            log.warning("reconcile: rollout %s has an unreadable policy (%s)", rollout_id, exc)
    return parsed


def _end_due(rt: Runtime, stats: Counter[str]) -> None:
    """Rollouts past their end time: what was never offered ends SKIPPED (offline or window_closed)."""
    now = utcnow()
    due = [i for i, p in _policies(rt, stats, RolloutState.RUNNING, RolloutState.PAUSED) if p.ended(now)]

    def end(rollout_id: int) -> None:
        skipped = skip_unreached(rt, rollout_id)
        stats["skipped_at_end"] += skipped

    _each(stats, "end", due, end)


def _join_continuous(rt: Runtime, stats: Counter[str]) -> None:
    now = utcnow()
    due = [
        i
        for i, p in _policies(rt, stats, RolloutState.RUNNING)
        if p.continuous and not p.ended(now) and scan_due(i, rt.settings.continuous_scan_s)
    ]

    def join(rollout_id: int) -> None:
        stats["joined"] += join_new_devices(rt, rollout_id)

    _each(stats, "join", due, join)


def _time_out(rt: Runtime, stats: Counter[str]) -> None:
    now = utcnow()
    # Past a rollout's end time nobody waits for an offline device any more: its clock runs again.
    past_end = [i for i, p in _policies(rt, stats, *_ACTIVE) if p.ended(now)]
    with rt.sessions() as session:
        # An offline device's clock stands still (ingest moves its deadlines when it comes back).
        expired = session.execute(
            select(
                DeviceUpdate.id,
                DeviceUpdate.state,
                DeviceUpdate.attempt,
                DeviceUpdate.rollout_id,
                DeviceUpdate.stop_requested_at,
            )
            .join(Device, Device.id == DeviceUpdate.device_id)
            .where(
                DeviceUpdate.state.in_((*UPDATE_IN_FLIGHT, UpdateState.ROLLING_BACK)),
                DeviceUpdate.deadline_at < now,
                or_(Device.online.is_(True), DeviceUpdate.rollout_id.in_(past_end)),
            )
            .limit(BATCH)
        ).all()
    by_rollout: dict[int, list[tuple[int, UpdateState, int, bool]]] = defaultdict(list)
    for r in expired:
        by_rollout[r.rollout_id].append(
            (r.id, UpdateState(r.state), r.attempt, r.stop_requested_at is not None)
        )
    ended: list[int] = []
    retrying: set[int] = set()

    def time_out(rollout_id: int) -> None:
        groups: dict[tuple[UpdateState, int, bool], list[int]] = defaultdict(list)
        for update_id, state, attempt, stopping in by_rollout[rollout_id]:
            groups[(state, attempt, stopping)].append(update_id)
        with rt.sessions() as session:
            policy = rollout_policy(session.get_one(Rollout, rollout_id))
            for (state, attempt, stopping), ids in groups.items():
                # No new attempt after a rollback that never confirmed, or for a device asked to stop.
                retry = attempt < policy.max_attempts and state != UpdateState.ROLLING_BACK and not stopping
                due = now + timedelta(seconds=policy.backoff(attempt))
                # The deadline in the WHERE clause too: a report that moved the row on meanwhile wins.
                moved = bulk_transition_where(
                    session,
                    UpdateEvent.TIMEOUT_RETRY if retry else UpdateEvent.TIMEOUT,
                    state,
                    DeviceUpdate.id.in_(ids),
                    DeviceUpdate.deadline_at < now,
                    values={"deadline_at": due} if retry else None,
                    error_code="timeout",
                    detail={"stage_state": str(state)},
                )
                if retry:
                    stats["timed_out_retry"] += len(moved)
                    if moved:
                        retrying.add(rollout_id)
                else:
                    stats["timed_out"] += len(moved)
                    ended.extend(m.id for m in moved)
            session.commit()

    _each(stats, "timeout", sorted(by_rollout), time_out)
    rt.marks.mark(*retrying)
    if ended:
        finalize(rt, ended)
    _each(stats, "admit", sorted(retrying), lambda rid: admit(rt, rid))


def _end_soaks(rt: Runtime, stats: Counter[str]) -> None:
    """Soaks that ended: a device heard from in its last ``silence_s`` succeeded; a silent one is
    told to roll back (``health``), like one that reported itself unhealthy."""
    now = utcnow()
    with rt.sessions() as session:
        due = session.execute(
            select(
                DeviceUpdate.id, DeviceUpdate.rollout_id, DeviceUpdate.updated_at, DeviceUpdate.deadline_at
            )
            .where(DeviceUpdate.state == UpdateState.SOAKING, DeviceUpdate.deadline_at < now)
            .limit(BATCH)
        ).all()
        if not due:
            return
        policies = {
            i: policy_of(i, created_at, doc)
            for i, created_at, doc in session.execute(
                select(Rollout.id, Rollout.created_at, Rollout.policy).where(
                    Rollout.id.in_({r.rollout_id for r in due})
                )
            )
        }
        healthy: list[int] = []
        silent: dict[int, list[int]] = defaultdict(list)
        for row in due:
            policy = policies[row.rollout_id]
            silence = timedelta(seconds=policy.soak.silence_s if policy.soak else 0)
            if row.updated_at >= row.deadline_at - silence:
                healthy.append(row.id)
            else:
                silent[row.rollout_id].append(row.id)
        passed = bulk_transition_where(
            session,
            UpdateEvent.SOAK_PASSED,
            UpdateState.SOAKING,
            DeviceUpdate.id.in_(healthy),
            DeviceUpdate.deadline_at < now,
        )
        rolling_back: list[int] = []
        for rollout_id, ids in silent.items():
            rollback_by = now + timedelta(seconds=policies[rollout_id].install_timeout_s)
            rolling_back += [
                m.id
                for m in bulk_transition_where(
                    session,
                    UpdateEvent.UNHEALTHY,
                    UpdateState.SOAKING,
                    DeviceUpdate.id.in_(ids),
                    DeviceUpdate.deadline_at < now,
                    values={"deadline_at": rollback_by},
                    error_code=str(ErrorCode.HEALTH),
                    detail={"reason": "no heartbeat at the end of the soak"},
                )
            ]
        session.commit()
    stats["soak_passed"] += len(passed)
    stats["soak_silent"] += len(rolling_back)
    if rolling_back:
        try:
            rt.dispatch.republish(rolling_back)
        except DispatchFailed as exc:
            log.warning("reconcile: %s; the rollback documents go out on a later pass", exc)
    if passed:
        finalize(rt, [m.id for m in passed])


def _requeue_due(rt: Runtime, stats: Counter[str]) -> None:
    with rt.sessions() as session:
        moved = bulk_transition_where(
            session,
            UpdateEvent.REQUEUE,
            UpdateState.RETRYING,
            DeviceUpdate.deadline_at <= utcnow(),
            values={"deadline_at": None},
        )
        session.commit()
    if moved:
        stats["requeued"] += len(moved)
        rollouts = sorted({m.rollout_id for m in moved})
        rt.marks.mark(*rollouts)
        _each(stats, "admit", rollouts, lambda rid: admit(rt, rid))


# The next move is ours (publish the offer, send the install): re-send after FLEET_STALL_S.
_OUR_MOVE = (UpdateState.OFFERED, UpdateState.VERIFIED)
# The device is busy (downloading, installing, rebooting): ask again only after a longer silence.
_DEVICE_BUSY = (
    UpdateState.DOWNLOADING,
    UpdateState.DOWNLOADED,
    UpdateState.INSTALLING,
    UpdateState.REBOOTING,
    UpdateState.SOAKING,  # a soaking device's heartbeats move its row: silence means it lost the document
    UpdateState.ROLLING_BACK,
)
BUSY_STALL_FACTOR = 3


def _redrive(rt: Runtime, stats: Counter[str]) -> None:
    now = utcnow()
    stall = timedelta(seconds=rt.settings.stall_s)
    due = DeviceUpdate.redrive_at.is_(None) | (DeviceUpdate.redrive_at <= now)
    with rt.sessions() as session:
        rows = session.execute(
            select(
                DeviceUpdate.id, DeviceUpdate.state, DeviceUpdate.updated_at, DeviceUpdate.stop_requested_at
            )
            .where(
                (DeviceUpdate.state.in_(_OUR_MOVE) & (DeviceUpdate.updated_at < now - stall))
                | (
                    DeviceUpdate.state.in_(_DEVICE_BUSY)
                    & (DeviceUpdate.updated_at < now - stall * BUSY_STALL_FACTOR)
                ),
                due,
            )
            .limit(BATCH)
        ).all()
        unfinalized = list(
            session.scalars(
                select(DeviceUpdate.id)
                .where(
                    DeviceUpdate.state.in_(UPDATE_END_STATES),
                    DeviceUpdate.finalized_at.is_(None),
                    DeviceUpdate.updated_at < now - stall,
                )
                .limit(BATCH)
            )
        )
        if rows:
            # The next re-send waits as long again as the row has been stalled (at most 10 min).
            table = DeviceUpdate.__table__
            session.connection().execute(
                update(table)  # type: ignore[arg-type]
                .where(table.c.id == bindparam("b_id"))
                .values(redrive_at=bindparam("b_at")),
                [
                    {"b_id": r.id, "b_at": now + min(max(now - r.updated_at, stall), MAX_REDRIVE_GAP)}
                    for r in rows
                ],
            )
            session.commit()
    # A stop request turns any stage into the cancel document, which republish sends.
    verified = [r.id for r in rows if r.state == UpdateState.VERIFIED and r.stop_requested_at is None]
    others = [r.id for r in rows if r.id not in set(verified)]
    try:
        if others:
            rt.dispatch.republish(others)
            stats["redrive_republish"] += len(others)
        if verified:
            rt.dispatch.install(verified)
            stats["redrive_install"] += len(verified)
    except DispatchFailed as exc:
        stats["redrive_dispatch_failed"] += 1
        log.warning("reconcile: %s", exc)
    if unfinalized:
        stats["redrive_finalize"] += finalize(rt, unfinalized)


def _webhooks(rt: Runtime, stats: Counter[str]) -> None:
    """New state changes become deliveries; new and due ones go to the workers."""
    created = webhook_delivery.fan_out(rt)
    pending = webhook_delivery.take_due(rt)  # the new ones included
    stats["webhooks_created"] += len(created)
    if pending:
        try:
            rt.dispatch.deliver_webhooks(pending)
            stats["webhooks_sent"] += len(pending)
        except DispatchFailed as exc:
            log.warning("reconcile: %s; webhook deliveries go out on a later pass", exc)


def _repair_rollouts(rt: Runtime, stats: Counter[str]) -> None:
    with rt.sessions() as session:
        rollouts = session.execute(
            select(Rollout.id, Rollout.status).where(Rollout.status.in_(_ACTIVE))
        ).all()
        running_waves = session.execute(
            select(Wave.id, Wave.rollout_id).where(
                Wave.status == WaveState.RUNNING, Wave.rollout_id.in_([r.id for r in rollouts])
            )
        ).all()
    waves_of: dict[int, list[int]] = defaultdict(list)
    for wave_id, rollout_id in running_waves:
        waves_of[rollout_id].append(wave_id)

    def repair(rollout_id: int) -> None:
        status = next(s for i, s in rollouts if i == rollout_id)
        stats["rollouts_checked"] += 1
        rt.marks.mark(rollout_id)
        waves = waves_of.get(rollout_id, [])
        if status == RolloutState.RUNNING and not waves:
            kick(rt, rollout_id)  # a lost kick: start the next wave, or complete
            stats["kicked"] += 1
            return
        with rt.sessions() as session:
            finished = [w for w in waves if not wave_is_open(session, w)]
            queued = status == RolloutState.RUNNING and bool(
                session.scalar(
                    select(func.count()).where(
                        DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.state == UpdateState.QUEUED
                    )
                )
            )
            free = queued and in_flight_count(session, rollout_id) < _max_in_flight(session, rollout_id)
        closed = 0
        for wave_id in finished:
            if close_wave(rt, wave_id) is not None:
                closed += 1
        stats["waves_closed"] += closed
        if free and not closed:  # a wave held open (continuous rollout) still admits
            stats["admitted"] += admit(rt, rollout_id)

    candidates = [i for i, s in rollouts if waves_of.get(i) or s == RolloutState.RUNNING]
    _each(stats, "rollout", candidates, repair)


def _max_in_flight(session: Session, rollout_id: int) -> int:
    rollout = session.get_one(Rollout, rollout_id)
    return rollout_policy(rollout).max_in_flight
