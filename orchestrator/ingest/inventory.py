"""Device registration and presence from the retained ``info`` and ``online`` topics."""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from orchestrator.models import Device, Event, utcnow
from orchestrator.protocol import DeviceInfo, is_reserved_device_id


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
    known = set(session.scalars(select(Device.id).where(Device.id.in_(ids))))
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
    updated = 0
    for device_id, info in infos.items():
        if device_id in known:
            values = {
                "model": info.model,
                "firmware_version": info.running_version,
                "slot": info.slot,
                "agent_version": info.agent_version,
                "last_seen": now,
            }
            if info.labels:
                values["labels"] = info.labels
            session.execute(update(Device).where(Device.id == device_id).values(**values))
            updated += 1
    for device_id, online in presence.items():
        if device_id in known or device_id in infos:
            session.execute(update(Device).where(Device.id == device_id).values(online=online, last_seen=now))
    session.commit()
    return len(new_rows), updated
