"""Rows for tests, written the way production code writes them."""

from __future__ import annotations

import hashlib

from sqlalchemy import insert
from sqlalchemy.orm import Session

from orchestrator.models import Device, Firmware, utcnow


def add_devices(
    session: Session, count: int, *, model: str = "sensor-v2", version: str = "1.0.0", prefix: str = "dev-"
) -> list[str]:
    ids = [f"{prefix}{i:05d}" for i in range(count)]
    now = utcnow()
    session.execute(
        insert(Device),
        [
            {
                "id": i,
                "model": model,
                "firmware_version": version,
                "labels": {},
                "online": True,
                "created_at": now,
            }
            for i in ids
        ],
    )
    session.commit()
    return ids


def add_firmware_row(session: Session, *, model: str = "sensor-v2", version: str = "1.1.0") -> Firmware:
    sha = hashlib.sha256(f"{model}-{version}".encode()).hexdigest()
    firmware = Firmware(
        model=model, version=version, size=1024, sha256=sha, signature="c2ln", storage_path="/dev/null"
    )
    session.add(firmware)
    session.commit()
    return firmware
