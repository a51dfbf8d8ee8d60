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
from orchestrator.errors import AlreadyExists, InvalidInput, NotFound, PayloadTooLarge
from orchestrator.models import Firmware
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
