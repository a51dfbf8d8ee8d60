"""Firmware images: content-addressed storage, signing and signature checks."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.config import Settings
from orchestrator.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
)
from orchestrator.models import Event, Firmware, utcnow
from orchestrator.protocol import FirmwareRef, verify_manifest_signature
from orchestrator.signing import load_private_key, load_public_key, sign_manifest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_CHUNK = 1024 * 1024


def _store(settings: Settings, stream: BinaryIO) -> tuple[Path, int, str]:
    """Copy ``stream`` into the firmware directory under its sha256; enforces the size limit."""
    settings.firmware_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=settings.firmware_dir, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if size > settings.max_firmware_bytes:
                    raise PayloadTooLarge(
                        f"firmware larger than the limit of {settings.max_firmware_bytes} bytes "
                        "(FLEET_MAX_FIRMWARE_BYTES)",
                        field="file",
                    )
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise InvalidInput("firmware file is empty", field="file")
        sha = digest.hexdigest()
        final = settings.firmware_dir / f"{sha}.bin"
        os.replace(tmp_name, final)
        return final, size, sha
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def add_firmware(
    session: Session,
    settings: Settings,
    stream: BinaryIO,
    *,
    model: str,
    version: str,
    signature: str | None = None,
) -> Firmware:
    """Store and register an image. Without ``signature`` the server's signing key signs it; a given
    signature must verify against the configured public key. (model, version) must be new. Commits."""
    for field, value in (("model", model), ("version", version)):
        if not _NAME.match(value):
            raise InvalidInput(
                f"{field} {value!r} must be 1-64 of letters, digits, '.', '_', '+', '-'", field=field
            )
    exists = session.scalar(select(Firmware.id).where(Firmware.model == model, Firmware.version == version))
    if exists is not None:
        raise AlreadyExists(f"firmware {model} {version} exists already (id {exists})", field="version")
    path, size, sha = _store(settings, stream)
    if signature is None:
        signature = sign_manifest(load_private_key(settings.signing_key_path), model, version, size, sha)
    else:
        ref = FirmwareRef(
            model=model, version=version, size=size, sha256=sha, signature=signature, url="-", token="-"
        )
        if not verify_manifest_signature(load_public_key(settings.public_key_path), ref):
            raise InvalidInput("signature does not verify against the fleet public key", field="signature")
    firmware = Firmware(
        model=model, version=version, size=size, sha256=sha, signature=signature, storage_path=str(path)
    )
    session.add(firmware)
    session.commit()
    return firmware


def get_firmware(session: Session, firmware_id: int) -> Firmware:
    firmware = session.get(Firmware, firmware_id)
    if firmware is None:
        raise NotFound(f"firmware {firmware_id} does not exist", field="firmware_id")
    return firmware


_RANGE = re.compile(r"^bytes=(\d{1,19})-(\d{0,19})$")


def check_range(header: str, size: int) -> None:
    """Accept a single ``bytes=START-[END]`` range inside the image; else 416 with the JSON error."""
    match = _RANGE.match(header.strip())
    if match is None:
        raise RangeNotSatisfiable(
            f"Range {header[:60]!r} is not a single byte range like 'bytes=1024-' or 'bytes=0-1023'",
            field="range",
        )
    start, end = int(match[1]), int(match[2]) if match[2] else None
    if start >= size or (end is not None and end < start):
        raise RangeNotSatisfiable(
            f"Range {header[:60]!r} is outside the image of {size} bytes", field="range", size=size
        )


def require_update_in_progress(session: Session, firmware_id: int, device_id: str) -> None:
    """The token's device must have an update of this firmware in flight (a token outlives its use)."""
    from orchestrator.models import DeviceUpdate, Rollout
    from orchestrator.state_machines import UPDATE_IN_FLIGHT

    active = session.scalar(
        select(DeviceUpdate.id)
        .join(Rollout, Rollout.id == DeviceUpdate.rollout_id)
        .where(
            DeviceUpdate.device_id == device_id,
            Rollout.firmware_id == firmware_id,
            DeviceUpdate.state.in_(UPDATE_IN_FLIGHT),
        )
        .limit(1)
    )
    if active is None:
        raise Forbidden(f"device {device_id} has no update of firmware {firmware_id} in progress")


def deprecate_firmware(session: Session, firmware_id: int, *, actor: str = "operator") -> Firmware:
    """Mark an image deprecated: no new rollout may use it; rollouts using it go on. Idempotent. Commits."""
    firmware = get_firmware(session, firmware_id)
    if firmware.deprecated_at is None:
        firmware.deprecated_at = utcnow()
        session.add(
            Event(
                kind="operator",
                name="firmware_deprecated",
                detail={"actor": actor, "firmware_id": firmware_id, "version": firmware.version},
                created_at=firmware.deprecated_at,
            )
        )
        session.commit()
    return firmware


def delete_firmware(session: Session, firmware_id: int, *, actor: str = "operator") -> None:
    """Delete an image and its file. Conflict while any rollout, of any status, refers to it
    (its history must stay readable): delete those rollouts' records first or keep the image. Commits."""
    from orchestrator.models import Rollout

    firmware = get_firmware(session, firmware_id)
    users = list(session.scalars(select(Rollout.id).where(Rollout.firmware_id == firmware_id).limit(11)))
    if users:
        listed = ", ".join(map(str, users[:10])) + (" and more" if len(users) > 10 else "")
        raise Conflict(
            f"firmware {firmware_id} is used by rollout(s) {listed}; deprecate it instead",
            field="firmware_id",
        )
    path = Path(firmware.storage_path)
    session.delete(firmware)
    session.add(
        Event(
            kind="operator",
            name="firmware_deleted",
            detail={
                "actor": actor,
                "firmware_id": firmware_id,
                "model": firmware.model,
                "version": firmware.version,
            },
            created_at=utcnow(),
        )
    )
    session.commit()
    # Files are stored by content: another image with the same bytes keeps the file.
    if session.scalar(select(Firmware.id).where(Firmware.storage_path == str(path)).limit(1)) is None:
        path.unlink(missing_ok=True)
