"""Turns a rollout request into rows: resolve targets, skip what cannot or need not update, cut waves."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from orchestrator.audit import record
from orchestrator.engine.waves import cancel_not_started
from orchestrator.errors import Conflict, InvalidInput, NotFound
from orchestrator.models import DeviceUpdate, Event, Firmware, Rollout, Wave, utcnow
from orchestrator.policy import RolloutPolicy, Target, split_into_waves
from orchestrator.state_machines import UpdateEvent
from orchestrator.targeting import busy_elsewhere, classify, resolve_group, resolve_target
from orchestrator.transitions import initial_update_state

NAMED_IN_CONFLICT = 20

_CHUNK = 5000  # stays below every backend's bound-parameter limit


def create_rollout(
    session: Session,
    *,
    name: str,
    firmware_id: int,
    target: Target,
    policy: RolloutPolicy,
    start_at: datetime | None = None,
    actor: str = "operator",
    supersede: bool = False,
) -> Rollout:
    """Create a SCHEDULED rollout with its waves and device updates, written in bulk. The caller commits.

    Devices of another model or already on the target version become SKIPPED with a reason. A device
    with an unfinished update in another active rollout is never silently displaced: without
    ``supersede`` that is a :class:`Conflict` naming the devices; with it, the older update is
    canceled where it has not started and left to finish where it has (this rollout's update of
    that device waits until then).
    """
    firmware = session.get(Firmware, firmware_id)
    if firmware is None:
        raise NotFound(f"firmware {firmware_id} does not exist", field="firmware_id")
    if firmware.deprecated_at is not None:
        raise Conflict(
            f"firmware {firmware_id} ({firmware.model} {firmware.version}) is deprecated; "
            "upload a newer image or pick another",
            field="firmware_id",
        )
    target = resolve_group(session, target)
    candidates = resolve_target(session, target)
    if not candidates and not policy.continuous:
        raise InvalidInput("the target selects no devices", field="target")
    eligible, skipped = classify(candidates, firmware, target.versions)
    busy = busy_elsewhere(session, [c.id for c in eligible])
    if busy and not supersede:
        names = ", ".join(sorted(busy)[:NAMED_IN_CONFLICT])
        more = f" and {len(busy) - NAMED_IN_CONFLICT} more" if len(busy) > NAMED_IN_CONFLICT else ""
        rollouts = ", ".join(str(r) for r in sorted(set(busy.values())))
        raise Conflict(
            f"{len(busy)} device(s) already have an unfinished update in rollout(s) {rollouts}: "
            f"{names}{more}; wait for it, abort it, or create this rollout with supersede=true "
            "(updates that have not started are canceled there, started ones finish first)",
            field="target",
        )

    rollout = Rollout(
        name=name,
        firmware_id=firmware.id,
        target=target.model_dump(mode="json", exclude_none=True, exclude_defaults=True),
        policy=policy.model_dump(mode="json"),
        total=len(candidates),
        start_at=start_at,
    )
    session.add(rollout)
    session.flush()

    # A continuous rollout keeps a last wave open for devices that join later, even if empty now.
    sizes = split_into_waves(len(eligible), policy.waves) or ([0] if policy.continuous else [])
    waves = [Wave(rollout_id=rollout.id, index=i, size=size) for i, size in enumerate(sizes)]
    session.add_all(waves)
    session.flush()

    now = utcnow()
    common = {"rollout_id": rollout.id, "attempt": 1, "progress": 0, "version": 1, "updated_at": now}
    pending = initial_update_state(None)
    rows: list[dict[str, Any]] = []
    offset = 0
    for wave, size in zip(waves, sizes, strict=True):
        for c in eligible[offset : offset + size]:
            rows.append({**common, "wave_id": wave.id, "device_id": c.id, "state": pending})
        offset += size
    skipped_state = initial_update_state(UpdateEvent.SKIP)
    skipped_rows = [
        {
            **common,
            "wave_id": None,
            "device_id": c.id,
            "state": skipped_state,
            "error_code": str(reason),
            "finished_at": now,
        }
        for c, reason in skipped
    ]
    # Core inserts on the table (the ORM's bulk path spent as long collecting rows as SQLite spent
    # writing them). A Core executemany takes its columns from the first row, so each list holds
    # rows of one shape.
    table = DeviceUpdate.__table__
    for shaped in (rows, skipped_rows):
        for start in range(0, len(shaped), _CHUNK):
            session.execute(insert(table), shaped[start : start + _CHUNK])  # type: ignore[arg-type]

    events: list[dict[str, Any]] = [
        {
            "kind": "operator",
            "name": "rollout_created",
            "rollout_id": rollout.id,
            "to_state": str(rollout.status),
            "detail": {"actor": actor, "eligible": len(eligible), "skipped": len(skipped), "waves": sizes},
            "created_at": now,
        }
    ]
    if skipped:
        ids = dict(
            session.execute(
                select(DeviceUpdate.device_id, DeviceUpdate.id).where(
                    DeviceUpdate.rollout_id == rollout.id, DeviceUpdate.state == skipped_state
                )
            )
            .tuples()
            .all()
        )
        events.extend(
            {
                "kind": "transition",
                "name": str(UpdateEvent.SKIP),
                "rollout_id": rollout.id,
                "device_update_id": ids[c.id],
                "device_id": c.id,
                "from_state": str(pending),
                "to_state": str(skipped_state),
                "attempt": 1,
                "detail": {"reason": str(reason)},
                "created_at": now,
            }
            for c, reason in skipped
        )
    for start in range(0, len(events), _CHUNK):
        session.execute(insert(Event), events[start : start + _CHUNK])
    if busy:
        _supersede(session, rollout.id, busy, actor)
    return rollout


def _supersede(session: Session, new_rollout_id: int, busy: dict[str, int], actor: str) -> None:
    """Cancel the older rollouts' not-yet-started updates of ``busy`` devices (started ones finish)."""
    now = utcnow()
    for old_rollout_id in sorted(set(busy.values())):
        devices = [d for d, r in busy.items() if r == old_rollout_id]
        canceled: list[int] = []
        for start in range(0, len(devices), _CHUNK):
            canceled += cancel_not_started(
                session,
                DeviceUpdate.rollout_id == old_rollout_id,
                DeviceUpdate.device_id.in_(devices[start : start + _CHUNK]),
                error_code="superseded",
                detail={"superseded_by": new_rollout_id},
            )
        record(
            session,
            actor=actor,
            action="rollout.supersede",
            target_kind="rollout",
            target_id=old_rollout_id,
            detail={"by_rollout": new_rollout_id, "devices": len(devices), "canceled": len(canceled)},
        )
        session.add(
            Event(
                kind="operator",
                name="rollout_superseded",
                rollout_id=old_rollout_id,
                detail={
                    "actor": actor,
                    "by_rollout": new_rollout_id,
                    "devices": len(devices),
                    "canceled": len(canceled),
                    "finishing": len(devices) - len(canceled),
                },
                created_at=now,
            )
        )
