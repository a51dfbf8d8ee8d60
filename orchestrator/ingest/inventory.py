"""Device registration and presence from the retained ``info`` and ``online`` topics."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from orchestrator.models import Device, DeviceUpdate, Event, utcnow
from orchestrator.protocol import DeviceInfo, is_reserved_device_id
from orchestrator.state_machines import UPDATE_IN_FLIGHT, UpdateState


def stop_clock_while_offline(session: Session, back: dict[str, datetime | None], now: datetime) -> None:
    """Stage timeouts count only while a device can act: a device coming back online has its
    in-flight deadlines pushed out by as long as it was away (its ``last_seen`` is when it left)."""
    rows = session.execute(
        select(DeviceUpdate.id, DeviceUpdate.device_id, DeviceUpdate.deadline_at).where(
            DeviceUpdate.device_id.in_(list(back)),
            DeviceUpdate.state.in_((*UPDATE_IN_FLIGHT, UpdateState.ROLLING_BACK)),
            DeviceUpdate.deadline_at.is_not(None),
        )
    ).all()
    shifted = [
        {"b_id": row_id, "b_deadline": deadline + (now - left)}
        for row_id, device_id, deadline in rows
        if deadline is not None and (left := back[device_id]) is not None and now > left
    ]
    if shifted:
        table = DeviceUpdate.__table__
        session.connection().execute(
            update(table)  # type: ignore[arg-type]
            .where(table.c.id == bindparam("b_id"))
            .values(deadline_at=bindparam("b_deadline")),
            shifted,
        )


def apply_inventory(
    session: Session, infos: dict[str, DeviceInfo], presence: dict[str, bool]
) -> tuple[int, int]:
    """Register unknown devices and refresh known ones; returns (registered, updated). Commits."""
    now = utcnow()
    # A reserved name (a service or portal login) is never registered as a device.
    infos = {d: i for d, i in infos.items() if not is_reserved_device_id(d)}
    presence = {d: p for d, p in presence.items() if not is_reserved_device_id(d)}
    ids = list(infos.keys() | presence.keys())
    if not ids:
        return 0, 0
    status = {
        device_id: (online, last_seen)
        for device_id, online, last_seen in session.execute(
            select(Device.id, Device.online, Device.last_seen).where(Device.id.in_(ids))
        )
    }
    known = set(status)
    back = {d: status[d][1] for d, o in presence.items() if o and d in status and not status[d][0]}
    if back:
        stop_clock_while_offline(session, back, now)
    new_rows = [
        {
            "id": device_id,
            "model": info.model,
            "firmware_version": info.running_version,
            "labels": info.labels,
            "slot": info.slot,
            "agent_version": info.agent_version,
            "online": presence.get(device_id, True),
            "last_seen": now,
            "created_at": now,
        }
        for device_id, info in infos.items()
        if device_id not in known
    ]
    if new_rows:
        session.execute(insert(Device), new_rows)
        session.execute(
            insert(Event),
            [
                {"kind": "inventory", "name": "device_registered", "device_id": r["id"], "created_at": now}
                for r in new_rows
            ],
        )
    table = Device.__table__
    # One executemany per kind of change: a batch of a thousand devices is two statements, not 2,000.
    refreshed = [
        {
            "b_id": device_id,
            "b_model": info.model,
            "b_version": info.running_version,
            "b_slot": info.slot,
            "b_agent": info.agent_version,
            "b_seen": now,
        }
        for device_id, info in infos.items()
        if device_id in known
    ]
    if refreshed:
        session.connection().execute(
            update(table)  # type: ignore[arg-type]
            .where(table.c.id == bindparam("b_id"))
            .values(
                model=bindparam("b_model"),
                firmware_version=bindparam("b_version"),
                slot=bindparam("b_slot"),
                agent_version=bindparam("b_agent"),
                last_seen=bindparam("b_seen"),
            ),
            refreshed,
        )
    labelled = [{"b_id": d, "b_labels": i.labels} for d, i in infos.items() if d in known and i.labels]
    if labelled:
        session.connection().execute(
            update(table).where(table.c.id == bindparam("b_id")).values(labels=bindparam("b_labels")),  # type: ignore[arg-type]
            labelled,
        )
    updated = len(refreshed)
    seen = [
        {"b_id": d, "b_online": o, "b_seen": now} for d, o in presence.items() if d in known or d in infos
    ]
    if seen:
        session.connection().execute(
            update(table)  # type: ignore[arg-type]
            .where(table.c.id == bindparam("b_id"))
            .values(online=bindparam("b_online"), last_seen=bindparam("b_seen")),
            seen,
        )
    session.commit()
    return len(new_rows), updated
