"""The retained ``desired`` document the orchestrator publishes for a device."""

from __future__ import annotations

from orchestrator.config import Settings
from orchestrator.models import Firmware
from orchestrator.protocol import Desired, FirmwareRef, Stage, desired_topic
from orchestrator.signing import make_download_token


def firmware_url(settings: Settings, firmware_id: int) -> str:
    return f"{settings.public_base_url.rstrip('/')}/v1/firmware/{firmware_id}/content"


def firmware_ref(settings: Settings, firmware: Firmware, device_id: str) -> FirmwareRef:
    """The image, where to fetch it, and a download token for ``device_id`` alone."""
    return FirmwareRef(
        model=firmware.model,
        version=firmware.version,
        size=firmware.size,
        sha256=firmware.sha256,
        signature=firmware.signature,
        url=firmware_url(settings, firmware.id),
        token=make_download_token(settings.secret_key, firmware.id, device_id),
    )


def desired_message(
    settings: Settings,
    *,
    update_id: int,
    attempt: int,
    stage: Stage,
    device_id: str,
    firmware: Firmware,
    heartbeat_s: float | None = None,
    install_before: float | None = None,
) -> tuple[str, bytes]:
    """(topic, payload) telling ``device_id`` what to do for this update and attempt."""
    ref = firmware_ref(settings, firmware, device_id)
    doc = Desired(
        update_id=update_id,
        attempt=attempt,
        stage=stage,
        firmware=ref,
        heartbeat_s=heartbeat_s,
        install_before=install_before,
    )
    return desired_topic(device_id), doc.to_payload()


def clear_desired_message(device_id: str) -> tuple[str, bytes]:
    """An empty retained payload removes the retained document: nothing left to do."""
    return desired_topic(device_id), b""
