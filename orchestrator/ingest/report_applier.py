"""Applies a batch of device reports to SQL in one transaction.

Reports may be duplicated, late or out of order: only forward transitions for the update's current
attempt are applied; everything else is counted, kept as an Event with ``accepted = false`` and
still refreshes the device's inventory (running version, last seen). Several reports of one update
in a batch are folded into one compare-and-set of its row (one Event per report all the same).

Besides the state, a report sets the stage deadline: reaching VERIFIED starts the install deadline,
a failure with attempts left makes the row RETRYING until its backoff has passed. Under a soak
policy a success makes the row SOAKING until the soak ends; the reports a soaking device repeats
are its heartbeats: a healthy one moves the soak's progress, an unhealthy one makes the row
ROLLING_BACK. SUCCEEDED counts
only with the target version running; otherwise the update FAILS with ``version_mismatch``.

The outcome says which steps the batch made due (install for new VERIFIED rows, finalize for new
end states, admission for rollouts with new RETRYING rows); ingest sends them after the commit.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from orchestrator.ingest.inventory import stop_clock_while_offline
from orchestrator.models import Device, DeviceUpdate, Event, Firmware, Rollout, utcnow
from orchestrator.policy import RolloutPolicy, SoakPolicy
from orchestrator.portal import device_message
from orchestrator.protocol import ErrorCode, Report, ReportState
from orchestrator.state_machines import (
    UPDATE_AWAITING_INSTALL,
    UPDATE_END_STATES,
    UPDATE_SOAK,
    UPDATE_TRANSITIONS,
    UpdateEvent,
    UpdateState,
    report_event,
)
from orchestrator.transitions import RowChange, apply_row_changes

log = logging.getLogger(__name__)

# A new attempt can fix a transfer or a transient device problem. An install-stage failure cannot:
# the device never installs the same update twice, so it would only answer with the same result.
RETRYABLE_ERRORS = frozenset({ErrorCode.CHECKSUM, ErrorCode.DOWNLOAD_ERROR, ErrorCode.DEVICE_ERROR})
CAS_ROUNDS = 3


@dataclass(slots=True)
class _Snapshot:
    id: int
    version: int
    state: UpdateState
    attempt: int
    device_id: str
    rollout_id: int
    wave_id: int | None
    last_seq: int | None
    progress: int
    deadline_at: datetime | None
    stop_requested: bool


@dataclass(frozen=True, slots=True)
class _RolloutInfo:
    max_attempts: int
    backoff: Callable[[int], float]
    install_timeout_s: float
    target_version: str
    soak: SoakPolicy | None


@dataclass
class BatchOutcome:
    """What the async side must do after the transaction committed."""

    portal: list[tuple[str, bytes]] = field(default_factory=list)
    install_ids: list[int] = field(default_factory=list)
    finalize_ids: list[int] = field(default_factory=list)
    # rows that entered a state whose stage document must go out (SOAKING: soak, ROLLING_BACK: rollback)
    stage_ids: list[int] = field(default_factory=list)
    retry_rollouts: set[int] = field(default_factory=set)
    dirty_rollouts: set[int] = field(default_factory=set)
    counters: Counter[str] = field(default_factory=Counter)
    # report ts (device clock) per applied report, for latency measurement
    applied_ts: list[float] = field(default_factory=list)
    # AWS IoT Jobs replies and notifications (not retained)
    jobs_replies: list[tuple[str, bytes]] = field(default_factory=list)

    def merge(self, other: BatchOutcome) -> None:
        self.portal += other.portal
        self.install_ids += other.install_ids
        self.finalize_ids += other.finalize_ids
        self.stage_ids += other.stage_ids
        self.retry_rollouts |= other.retry_rollouts
        self.dirty_rollouts |= other.dirty_rollouts
        self.counters.update(other.counters)
        self.applied_ts += other.applied_ts
        self.jobs_replies += other.jobs_replies


@dataclass(slots=True)
class _Plan:
    """One row's reports folded: the events to apply, the final values, the Event rows."""

    snap: _Snapshot
    events: list[UpdateEvent] = field(default_factory=list)
    state: UpdateState = UpdateState.PENDING
    progress: int = 0
    last_seq: int | None = None
    error_code: str | None = None
    deadline_at: datetime | None = None
    event_rows: list[dict[str, Any]] = field(default_factory=list)
    applied: list[Report] = field(default_factory=list)
    last_report: Report | None = None


class ReportApplier:
    """Stateless apart from a cache of per-rollout policy facts (they never change)."""

    def __init__(self) -> None:
        self._rollouts: dict[int, _RolloutInfo] = {}

    # ------------------------------------------------------------------ loading
    def _load(self, session: Session, ids: list[int]) -> dict[int, _Snapshot]:
        rows = session.execute(
            select(
                DeviceUpdate.id,
                DeviceUpdate.version,
                DeviceUpdate.state,
                DeviceUpdate.attempt,
                DeviceUpdate.device_id,
                DeviceUpdate.rollout_id,
                DeviceUpdate.wave_id,
                DeviceUpdate.last_seq,
                DeviceUpdate.progress,
                DeviceUpdate.deadline_at,
                DeviceUpdate.stop_requested_at,
            ).where(DeviceUpdate.id.in_(ids))
        )
        snaps = {
            r[0]: _Snapshot(
                r[0], r[1], UpdateState(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10] is not None
            )
            for r in rows
        }
        unknown = {s.rollout_id for s in snaps.values()} - self._rollouts.keys()
        if unknown:
            for rollout_id, policy, version in session.execute(
                select(Rollout.id, Rollout.policy, Firmware.version)
                .join(Firmware, Firmware.id == Rollout.firmware_id)
                .where(Rollout.id.in_(unknown))
            ):
                parsed = RolloutPolicy.model_validate(policy)
                self._rollouts[rollout_id] = _RolloutInfo(
                    parsed.max_attempts, parsed.backoff, parsed.install_timeout_s, version, parsed.soak
                )
        return snaps

    # ------------------------------------------------------------------ applying
    def apply(
        self, session: Session, reports: list[tuple[str, Report]], *, soak: bool = True
    ) -> BatchOutcome:
        """Apply ``(device_id, report)`` pairs and commit. Reports are taken in seq order per device.

        ``soak=False`` for devices that cannot soak (AWS Jobs devices send no health heartbeats):
        their success ends the update at once."""
        out = BatchOutcome()
        now = utcnow()
        by_update: dict[int, list[tuple[str, Report]]] = defaultdict(list)
        inventory: dict[str, str] = {}
        for device_id, report in sorted(reports, key=lambda dr: (dr[0], dr[1].seq)):
            by_update[report.update_id].append((device_id, report))
            inventory[device_id] = report.running_version
        events: list[dict[str, Any]] = []
        pending = dict(by_update)
        for _round in range(CAS_ROUNDS):
            snaps = self._load(session, sorted(pending))
            plans: list[_Plan] = []
            for update_id, items in pending.items():
                snap = snaps.get(update_id)
                if snap is None:
                    out.counters["unknown_update"] += len(items)
                    log.info("report for unknown update %s dropped", update_id)
                    continue
                plan = self._plan(snap, items, now, out, soak)
                if not plan.events and plan.progress == snap.progress and plan.last_seq == snap.last_seq:
                    events.extend(plan.event_rows)  # nothing to write but the ignored reports
                    continue
                plans.append(plan)
            lost = apply_row_changes(session, [_change(plan) for plan in plans])
            conflicts = {plan.snap.id: pending[plan.snap.id] for plan in plans if plan.snap.id in lost}
            for plan in plans:
                if plan.snap.id not in lost:
                    events.extend(plan.event_rows)
                    self._record(plan, out)
            if not conflicts:
                break
            out.counters["cas_retries"] += len(conflicts)
            pending = conflicts
        else:
            out.counters["dropped_after_conflicts"] += sum(len(v) for v in pending.values())
        if events:
            session.execute(insert(Event), events)
        if inventory:
            _refresh_inventory(session, inventory, now)
        session.commit()
        return out

    def _plan(
        self, snap: _Snapshot, items: list[tuple[str, Report]], now: datetime, out: BatchOutcome, soak: bool
    ) -> _Plan:
        info = self._rollouts[snap.rollout_id]
        plan = _Plan(snap=snap, state=snap.state, progress=snap.progress, last_seq=snap.last_seq)
        for device_id, report in items:
            reason = self._check(plan, device_id, report)
            if reason is not None:
                out.counters[f"ignored_{reason}"] += 1
                plan.event_rows.append(_report_event(plan, device_id, report, accepted=False, reason=reason))
                continue
            state, error, detail = report.state, (str(report.error) if report.error else None), None
            if state == ReportState.SUCCEEDED and report.running_version != info.target_version:
                state, error = ReportState.FAILED, str(ErrorCode.VERSION_MISMATCH)
                detail = f"reported success while running {report.running_version}, not {info.target_version}"
                out.counters["version_mismatch"] += 1
            retryable = error is None or error in RETRYABLE_ERRORS
            # An operator asked this update to stop: a failed attempt is its end, not a retry.
            attempts_left = retryable and snap.attempt < info.max_attempts and not snap.stop_requested
            event = report_event(state, attempts_left)
            heartbeat = plan.state == UpdateState.SOAKING and state == ReportState.SUCCEEDED
            if heartbeat and report.health is not None and not report.health.app_healthy:
                event, error = UpdateEvent.UNHEALTHY, str(ErrorCode.HEALTH)
                out.counters["unhealthy"] += 1
            elif event == UpdateEvent.REPORT_SUCCEEDED and info.soak is not None and soak:
                event = UpdateEvent.REPORT_SUCCEEDED_SOAK
            new = UPDATE_TRANSITIONS.get((plan.state, event))
            progress_only = new is None and (
                heartbeat
                or (
                    plan.state == UpdateState.DOWNLOADING
                    and state == ReportState.DOWNLOADING
                    and report.progress > plan.progress
                )
            )
            if new is None and not progress_only:
                reason = "after_end" if plan.state in UPDATE_END_STATES else "not_forward"
                out.counters[f"ignored_{reason}"] += 1
                plan.event_rows.append(_report_event(plan, device_id, report, accepted=False, reason=reason))
                continue
            before = plan.state
            if new is not None:
                plan.events.append(event)
                plan.state = new
                if error is not None:
                    plan.error_code = error
                if new in UPDATE_AWAITING_INSTALL and before not in UPDATE_AWAITING_INSTALL:
                    plan.deadline_at = now + timedelta(seconds=info.install_timeout_s)
                elif new == UpdateState.RETRYING:
                    plan.deadline_at = now + timedelta(seconds=info.backoff(snap.attempt))
                elif new == UpdateState.SOAKING and info.soak is not None:
                    plan.deadline_at = now + timedelta(seconds=info.soak.duration_s)
                elif new == UpdateState.ROLLING_BACK:
                    plan.deadline_at = now + timedelta(seconds=info.install_timeout_s)
            if plan.state == UpdateState.SOAKING:
                plan.progress = _soak_progress(plan, snap, info, now)
            elif plan.state == UpdateState.SUCCEEDED:
                plan.progress = 100
            elif plan.state != UpdateState.ROLLING_BACK:
                plan.progress = report.progress
            plan.last_seq = report.seq
            plan.applied.append(report)
            plan.last_report = report
            row = _report_event(plan, device_id, report, accepted=True, reason=None, before=before)
            if detail is not None:
                row["detail"]["mismatch"] = detail
                row["detail"]["error"] = error
            plan.event_rows.append(row)
        return plan

    @staticmethod
    def _check(plan: _Plan, device_id: str, report: Report) -> str | None:
        if plan.snap.device_id != device_id:
            log.warning(
                "device %s reported on update %s of device %s: dropped",
                device_id,
                plan.snap.id,
                plan.snap.device_id,
            )
            return "device_mismatch"
        if report.attempt != plan.snap.attempt:
            return "other_attempt"
        if plan.last_seq is not None and report.seq <= plan.last_seq:
            return "duplicate_or_late"
        return None

    @staticmethod
    def _record(plan: _Plan, out: BatchOutcome) -> None:
        snap = plan.snap
        out.counters["applied"] += len(plan.applied)
        out.applied_ts.extend(r.ts for r in plan.applied if r.ts is not None)
        out.dirty_rollouts.add(snap.rollout_id)
        last = plan.last_report
        out.portal.append(
            device_message(
                rollout_id=snap.rollout_id,
                device_id=snap.device_id,
                update_id=snap.id,
                state=str(plan.state),
                attempt=snap.attempt,
                progress=plan.progress,
                error=plan.error_code,
                running_version=last.running_version if last is not None else None,
            )
        )
        if plan.state == snap.state:
            return
        if plan.state == UpdateState.VERIFIED:
            out.install_ids.append(snap.id)
        elif plan.state in UPDATE_SOAK:
            out.stage_ids.append(snap.id)
            if plan.state == UpdateState.SOAKING:
                out.retry_rollouts.add(snap.rollout_id)  # a soaking device holds no slot: admit
        elif plan.state in UPDATE_END_STATES:
            out.finalize_ids.append(snap.id)
        elif plan.state == UpdateState.RETRYING:
            out.retry_rollouts.add(snap.rollout_id)


def _soak_progress(plan: _Plan, snap: _Snapshot, info: _RolloutInfo, now: datetime) -> int:
    """How far the soak is, in percent of its duration (100 only once it passed)."""
    soak = info.soak
    ends = plan.deadline_at or snap.deadline_at
    if soak is None or ends is None:
        return 0
    elapsed = soak.duration_s - (ends - now).total_seconds()
    return max(0, min(99, int(100 * elapsed / soak.duration_s)))


def _change(plan: _Plan) -> RowChange:
    return RowChange(
        du_id=plan.snap.id,
        expected_version=plan.snap.version,
        old=plan.snap.state,
        events=tuple(plan.events),
        new=plan.state,
        progress=plan.progress,
        last_seq=plan.last_seq,
        error_code=plan.error_code,
        deadline_at=plan.deadline_at,
        set_deadline=plan.deadline_at is not None,
    )


def _refresh_inventory(session: Session, versions: dict[str, str], now: datetime) -> None:
    status = {
        device_id: (online, last_seen)
        for device_id, online, last_seen in session.execute(
            select(Device.id, Device.online, Device.last_seen).where(Device.id.in_(list(versions)))
        )
    }
    known = set(status)
    # A report is a sign of life too: a device back before its presence message is, for its clock.
    back = {d: seen for d, (online, seen) in status.items() if not online}
    if back:
        stop_clock_while_offline(session, back, now)
    params = [{"b_id": d, "b_version": v, "b_seen": now} for d, v in versions.items() if d in known]
    if params:
        table = Device.__table__
        session.connection().execute(
            update(table)  # type: ignore[arg-type]
            .where(table.c.id == bindparam("b_id"))
            .values(firmware_version=bindparam("b_version"), last_seen=bindparam("b_seen"), online=True),
            params,
        )


def _report_event(
    plan: _Plan,
    device_id: str,
    report: Report,
    *,
    accepted: bool,
    reason: str | None,
    before: UpdateState | None = None,
) -> dict[str, Any]:
    snap = plan.snap
    detail: dict[str, Any] = {"progress": report.progress, "running_version": report.running_version}
    if report.error:
        detail["error"] = str(report.error)
    if report.detail:
        detail["message"] = report.detail
    if report.health is not None:
        detail["health"] = report.health.model_dump()
    if reason:
        detail["ignored"] = reason
    return {
        "kind": "report",
        "name": str(report.state),
        "rollout_id": snap.rollout_id,
        "wave_id": snap.wave_id,
        "device_update_id": snap.id,
        "device_id": device_id,
        "from_state": str(before if before is not None else plan.state),
        "to_state": str(plan.state) if accepted else None,
        "attempt": report.attempt,
        "seq": report.seq,
        "accepted": accepted,
        "detail": detail,
        "created_at": utcnow(),
    }
