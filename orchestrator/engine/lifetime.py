"""A rollout's lifetime beyond its waves: devices joining a continuous rollout, and its end time.

* **Continuous.** A continuous rollout's last wave stays RUNNING until the rollout's ``end_at``
  (or an abort or halt). Every pass the reconciler looks for devices that match the rollout's
  target but have no update in it (newly registered, newly tagged, ...), and adds the eligible
  ones to the last wave as QUEUED; admission offers them like any other.
* **End time.** Once ``end_at`` has passed no offer goes out (admission checks it); updates never
  offered end SKIPPED: ``offline`` when the device is offline, else ``window_closed``. They do not
  count against any threshold. Updates already offered finish.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from orchestrator.engine.runtime import Runtime
from orchestrator.engine.steps import finalize
from orchestrator.engine.waves import rollout_policy
from orchestrator.models import Device, DeviceUpdate, Event, Firmware, Rollout, Wave, utcnow
from orchestrator.policy import Target
from orchestrator.protocol import ErrorCode
from orchestrator.state_machines import UPDATE_NOT_STARTED, RolloutState, UpdateEvent, UpdateState, WaveState
from orchestrator.targeting import busy_elsewhere, classify, resolve_target
from orchestrator.transitions import bulk_transition_where, initial_update_state

log = logging.getLogger(__name__)
# Resolving a target reads the inventory: once per FLEET_CONTINUOUS_SCAN_S per rollout is plenty.
_last_scan: dict[int, float] = {}


def scan_due(rollout_id: int, interval_s: float) -> bool:
    """Whether this process should look for new devices for ``rollout_id`` now (and note that it did)."""
    now = time.monotonic()
    if now - _last_scan.get(rollout_id, -interval_s) < interval_s:
        return False
    _last_scan[rollout_id] = now
    return True


def join_new_devices(rt: Runtime, rollout_id: int) -> int:
    """Add devices that newly match a continuous rollout to its last wave; returns how many joined.

    Rollout must be RUNNING, continuous and before its end time, else nothing happens. Devices busy
    in another active rollout wait for a later scan.
    """
    now = utcnow()
    with rt.sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None or rollout.status != RolloutState.RUNNING:
            return 0
        policy = rollout_policy(rollout)
        if not policy.continuous or policy.ended(now):
            return 0
        target = Target.model_validate(rollout.target)
        firmware = session.get_one(Firmware, rollout.firmware_id)
        present = set(
            session.scalars(select(DeviceUpdate.device_id).where(DeviceUpdate.rollout_id == rollout_id))
        )
        fresh = (
            [
                c
                for c in resolve_target(session, target.model_copy(update={"device_ids": None}))
                if c.id not in present
            ]
            if target.device_ids is None
            else []
        )
        eligible, _ = classify(fresh, firmware, target.versions)
        busy = busy_elsewhere(session, [c.id for c in eligible])
        joining = [c.id for c in eligible if c.id not in busy]
        if not joining:
            return 0
        wave = session.scalars(
            select(Wave).where(Wave.rollout_id == rollout_id).order_by(Wave.index.desc())
        ).first()
        if wave is None:
            return 0
        _add_rows(session, rollout, wave, joining, now)
        session.commit()
    log.info("rollout %s: %d device(s) joined", rollout_id, len(joining))
    rt.marks.mark(rollout_id)
    from orchestrator.engine.admission import admit

    admit(rt, rollout_id)
    return len(joining)


def _add_rows(session: Session, rollout: Rollout, wave: Wave, device_ids: list[str], now: Any) -> None:
    session.execute(
        insert(DeviceUpdate),
        [
            {
                "rollout_id": rollout.id,
                "wave_id": wave.id,
                "device_id": device_id,
                "state": initial_update_state(None),
                "attempt": 1,
                "progress": 0,
                "version": 1,
                "updated_at": now,
            }
            for device_id in device_ids
        ],
    )
    wave.size += len(device_ids)
    rollout.total += len(device_ids)
    session.add(
        Event(
            kind="transition",
            name="devices_joined",
            rollout_id=rollout.id,
            wave_id=wave.id,
            detail={"devices": len(device_ids), "sample": device_ids[:10]},
            created_at=now,
        )
    )
    if wave.status == WaveState.RUNNING:
        bulk_transition_where(
            session,
            UpdateEvent.ENQUEUE,
            UpdateState.PENDING,
            DeviceUpdate.wave_id == wave.id,
            DeviceUpdate.device_id.in_(device_ids),
        )


def holds_last_wave_open(session: Session, rollout: Rollout, wave: Wave) -> bool:
    """A continuous rollout's last wave stays open while the rollout runs and its end has not come."""
    if rollout.status not in (RolloutState.RUNNING, RolloutState.PAUSED):
        return False
    policy = rollout_policy(rollout)
    if not policy.continuous or policy.ended(utcnow()):
        return False
    last = session.scalar(select(Wave.index).where(Wave.rollout_id == rollout.id).order_by(Wave.index.desc()))
    return wave.index == last


def skip_unreached(rt: Runtime, rollout_id: int) -> int:
    """Updates of ``rollout_id`` never offered end SKIPPED (offline / window_closed); returns how many.

    Meant for a rollout whose end time has passed; the caller checks that.
    """
    offline = select(Device.id).where(Device.online.is_(False))
    moved: list[int] = []
    with rt.sessions() as session:
        for state in sorted(UPDATE_NOT_STARTED):
            for criterion, code in (
                (DeviceUpdate.device_id.in_(offline), ErrorCode.OFFLINE),
                (DeviceUpdate.device_id.not_in(offline), ErrorCode.WINDOW_CLOSED),
            ):
                rows = bulk_transition_where(
                    session,
                    UpdateEvent.SKIP,
                    state,
                    DeviceUpdate.rollout_id == rollout_id,
                    criterion,
                    error_code=str(code),
                    detail={"reason": "end_at passed"},
                )
                moved += [r.id for r in rows]
        session.commit()
    if moved:
        log.info("rollout %s reached its end time: %d device(s) skipped", rollout_id, len(moved))
        finalize(rt, moved)  # portal documents, and closes the waves that emptied
    return len(moved)
