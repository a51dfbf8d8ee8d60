"""Applies a batch of device reports to SQL in one transaction.

Reports may be duplicated, late or out of order: only forward transitions for the update's current
attempt are applied; everything else is counted, kept as an Event with ``accepted = false`` and
still refreshes the device's inventory (running version, last seen).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from orchestrator.models import Device, DeviceUpdate, Event, Rollout, utcnow
from orchestrator.portal import device_message
from orchestrator.protocol import ErrorCode, Report, ReportState
from orchestrator.services.policy import RolloutPolicy
from orchestrator.state_machines import (
    UPDATE_AWAITING_INSTALL,
    UPDATE_END_STATES,
    UPDATE_TRANSITIONS,
    UpdateState,
    report_event,
)
from orchestrator.transitions import ReportChange, apply_report_change
from orchestrator.worker.continuations import Stage

log = logging.getLogger(__name__)

# A new attempt can fix a transfer or a transient device problem. An install-stage failure cannot:
# the device never installs the same update twice, so it would only answer with the same result.
RETRYABLE_ERRORS = frozenset({ErrorCode.CHECKSUM, ErrorCode.DOWNLOAD_ERROR, ErrorCode.DEVICE_ERROR})


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


@dataclass
class BatchOutcome:
    """What the async side must do after the transaction committed."""

    portal: list[tuple[str, bytes]] = field(default_factory=list)
    claims: list[tuple[int, int, Stage]] = field(default_factory=list)
    dirty_rollouts: set[int] = field(default_factory=set)
    counters: Counter[str] = field(default_factory=Counter)
    # report ts (device clock) per applied report, for latency measurement
    applied_ts: list[float] = field(default_factory=list)


class ReportApplier:
    """Stateless apart from a cache of per-rollout max attempts (policies never change)."""

    def __init__(self) -> None:
        self._max_attempts: dict[int, int] = {}

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
            ).where(DeviceUpdate.id.in_(ids))
        )
        snaps = {r[0]: _Snapshot(r[0], r[1], UpdateState(r[2]), *r[3:]) for r in rows}
        unknown_rollouts = {s.rollout_id for s in snaps.values()} - self._max_attempts.keys()
        if unknown_rollouts:
            for rollout_id, policy in session.execute(
                select(Rollout.id, Rollout.policy).where(Rollout.id.in_(unknown_rollouts))
            ):
                self._max_attempts[rollout_id] = RolloutPolicy.model_validate(policy).max_attempts
        return snaps

    def apply(self, session: Session, reports: list[tuple[str, Report]]) -> BatchOutcome:
        """Apply ``(device_id, report)`` pairs; commits. Reports are processed in seq order per device."""
        out = BatchOutcome()
        ordered = sorted(reports, key=lambda dr: (dr[0], dr[1].seq))
        pending = ordered
        events: list[dict[str, Any]] = []
        inventory: dict[str, tuple[str, datetime]] = {}
        now = utcnow()
        for round_no in range(3):  # a concurrent writer loses us a CAS at most a few times
            snaps = self._load(session, sorted({r.update_id for _, r in pending}))
            retry: list[tuple[str, Report]] = []
            for device_id, report in pending:
                if round_no == 0:
                    inventory[device_id] = (report.running_version, now)
                verdict = self._apply_one(session, snaps, device_id, report, events, out)
                if verdict == "conflict":
                    retry.append((device_id, report))
            if not retry:
                break
            pending = retry
            out.counters["cas_retries"] += len(retry)
        else:
            out.counters["dropped_after_conflicts"] += len(pending)
        if events:
            session.execute(insert(Event), events)
        if inventory:
            known = set(session.scalars(select(Device.id).where(Device.id.in_(list(inventory)))))
            params = [
                {"b_id": d, "b_version": v, "b_seen": t} for d, (v, t) in inventory.items() if d in known
            ]
            if params:
                session.connection().execute(
                    update(Device.__table__)  # type: ignore[arg-type]
                    .where(Device.__table__.c.id == bindparam("b_id"))
                    .values(
                        firmware_version=bindparam("b_version"), last_seen=bindparam("b_seen"), online=True
                    ),
                    params,
                )
        session.commit()
        return out

    def _apply_one(
        self,
        session: Session,
        snaps: dict[int, _Snapshot],
        device_id: str,
        report: Report,
        events: list[dict[str, Any]],
        out: BatchOutcome,
    ) -> str:
        snap = snaps.get(report.update_id)
        if snap is None:
            out.counters["unknown_update"] += 1
            log.info("report from %s for unknown update %s dropped", device_id, report.update_id)
            return "ignored"
        if snap.device_id != device_id:
            out.counters["device_mismatch"] += 1
            log.warning(
                "device %s reported on update %s of device %s: dropped", device_id, snap.id, snap.device_id
            )
            return "ignored"
        reason: str | None = None
        if report.attempt != snap.attempt:
            reason = "other_attempt"
        elif snap.last_seq is not None and report.seq <= snap.last_seq:
            reason = "duplicate_or_late"
        retryable = report.error is None or report.error in RETRYABLE_ERRORS
        attempts_left = retryable and snap.attempt < self._max_attempts.get(snap.rollout_id, 1)
        event = report_event(report.state, attempts_left)
        new = UPDATE_TRANSITIONS.get((snap.state, event)) if reason is None else None
        progress_only = (
            reason is None
            and new is None
            and snap.state == UpdateState.DOWNLOADING
            and report.state == ReportState.DOWNLOADING
            and report.progress > snap.progress
        )
        if new is None and not progress_only:
            reason = reason or ("after_end" if snap.state in UPDATE_END_STATES else "not_forward")
            out.counters[f"ignored_{reason}"] += 1
            events.append(_report_event(snap, device_id, report, accepted=False, reason=reason))
            return "ignored"
        target = new if new is not None else snap.state
        change = ReportChange(
            du_id=snap.id,
            expected_version=snap.version,
            event=event,
            old=snap.state,
            new=target,
            progress=report.progress,
            error_code=str(report.error) if report.error else None,
            seq=report.seq,
            deadline_at=None,
        )
        row = _report_event(snap, device_id, report, accepted=True, reason=None, to_state=target)
        if progress_only:
            ok = _apply_progress(session, snap, report)
            if ok:
                events.append(row)
        else:
            ok = apply_report_change(session, change, row)
        if not ok:
            return "conflict"
        snap.version += 1
        snap.state = target
        snap.last_seq = report.seq
        snap.progress = 100 if target == UpdateState.SUCCEEDED else report.progress
        out.counters["applied"] += 1
        if report.ts is not None:
            out.applied_ts.append(report.ts)
        out.dirty_rollouts.add(snap.rollout_id)
        out.portal.append(
            device_message(
                rollout_id=snap.rollout_id,
                device_id=device_id,
                update_id=snap.id,
                state=str(target),
                attempt=snap.attempt,
                progress=snap.progress,
                error=change.error_code,
                running_version=report.running_version,
            )
        )
        if not progress_only:
            out.claims.extend(_claims_for(snap.id, snap.attempt, target))
        return "applied"


def _claims_for(update_id: int, attempt: int, state: UpdateState) -> list[tuple[int, int, Stage]]:
    """Which parked continuations a newly reached state releases."""
    if state in UPDATE_AWAITING_INSTALL:
        return [(update_id, attempt, "verified")]
    if state in UPDATE_END_STATES or state == UpdateState.RETRYING:
        return [(update_id, attempt, "verified"), (update_id, attempt, "done")]
    return []


def _apply_progress(session: Session, snap: _Snapshot, report: Report) -> bool:
    result = session.execute(
        update(DeviceUpdate)
        .where(DeviceUpdate.id == snap.id, DeviceUpdate.version == snap.version)
        .values(progress=report.progress, last_seq=report.seq, version=snap.version + 1, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _report_event(
    snap: _Snapshot,
    device_id: str,
    report: Report,
    *,
    accepted: bool,
    reason: str | None,
    to_state: UpdateState | None = None,
) -> dict[str, Any]:
    detail: dict[str, Any] = {"progress": report.progress, "running_version": report.running_version}
    if report.error:
        detail["error"] = str(report.error)
    if report.detail:
        detail["message"] = report.detail
    if reason:
        detail["ignored"] = reason
    return {
        "kind": "report",
        "name": str(report.state),
        "rollout_id": snap.rollout_id,
        "wave_id": snap.wave_id,
        "device_update_id": snap.id,
        "device_id": device_id,
        "from_state": str(snap.state),
        "to_state": str(to_state) if to_state is not None else None,
        "attempt": report.attempt,
        "seq": report.seq,
        "accepted": accepted,
        "detail": detail,
        "created_at": utcnow(),
    }
