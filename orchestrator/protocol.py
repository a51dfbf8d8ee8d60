"""Wire protocol between the orchestrator and devices (MQTT topics and JSON payloads).

This module is the only part of ``orchestrator`` that device code may import: it depends on
pydantic, cryptography and the standard library only. docs/protocol.md describes it for humans.
"""

from __future__ import annotations

import base64
import binascii
import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

PROTOCOL_VERSION = "v1"
TOPIC_ROOT = f"fleet/{PROTOCOL_VERSION}"
ONLINE = "online"
OFFLINE = "offline"
# Device ids appear in topic paths, client ids and broker password files: no wildcards, no separators.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Names of the orchestrator's own broker users and client-id prefixes: never a device.
RESERVED_DEVICE_IDS = frozenset({"service", "portal", "admin", "root", "fleet"})
RESERVED_DEVICE_PREFIXES = ("fleet-", "portal-", "svc-", "sys-")


def is_reserved_device_id(device_id: str) -> bool:
    """True for ids a device may not have: they name (or prefix) the orchestrator's own clients."""
    lowered = device_id.lower()
    return lowered in RESERVED_DEVICE_IDS or lowered.startswith(RESERVED_DEVICE_PREFIXES)


# Every number a device sends must fit a signed 64-bit column (BIGINT on PostgreSQL, INTEGER in SQLite).
MAX_ID = 2**63 - 1
MAX_ATTEMPT = 100
# Largest device message ingest parses; anything bigger is rejected unread.
MAX_DEVICE_PAYLOAD = 8 * 1024

Id = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
# Versions, models and labels are stored in 64-character columns; printable, no control characters.
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[\x20-\x7e]+$")]


# ---------------------------------------------------------------- topics
def desired_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/devices/{device_id}/desired"


def report_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/devices/{device_id}/report"


def info_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/devices/{device_id}/info"


def online_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/devices/{device_id}/online"


def portal_rollout_topic(rollout_id: int) -> str:
    return f"{TOPIC_ROOT}/portal/rollouts/{rollout_id}"


def portal_device_topic(rollout_id: int, device_id: str) -> str:
    return f"{TOPIC_ROOT}/portal/rollouts/{rollout_id}/devices/{device_id}"


REPORT_SUBSCRIPTION = f"{TOPIC_ROOT}/devices/+/report"
INFO_SUBSCRIPTION = f"{TOPIC_ROOT}/devices/+/info"
ONLINE_SUBSCRIPTION = f"{TOPIC_ROOT}/devices/+/online"
PORTAL_SUBSCRIPTION = f"{TOPIC_ROOT}/portal/#"


def device_topic_parts(topic: str) -> tuple[str, str] | None:
    """Split ``fleet/v1/devices/{id}/{kind}`` into (id, kind); None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "fleet" or parts[1] != PROTOCOL_VERSION or parts[2] != "devices":
        return None
    return parts[3], parts[4]


# ---------------------------------------------------------------- enums
class ReportState(StrEnum):
    """States a device reports for an update; names match DeviceUpdate states."""

    DOWNLOADING = "DOWNLOADING"
    DOWNLOADED = "DOWNLOADED"
    VERIFIED = "VERIFIED"
    INSTALLING = "INSTALLING"
    REBOOTING = "REBOOTING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    CANCELED = "CANCELED"  # dropped on stage ``cancel`` before installing anything


class ErrorCode(StrEnum):
    """Reason codes carried by FAILED / ROLLED_BACK reports and by server-side end states."""

    CHECKSUM = "checksum"
    SIGNATURE = "signature"
    INCOMPATIBLE = "incompatible"
    DOWNLOAD_ERROR = "download_error"
    INSTALL_ERROR = "install_error"
    BOOT_FAILURE = "boot_failure"
    DEVICE_ERROR = "device_error"
    TIMEOUT = "timeout"
    ALREADY_ON_TARGET = "already_on_target"
    CANCELED = "canceled"
    VERSION_MISMATCH = "version_mismatch"
    HEALTH = "health"  # unhealthy during the soak after an update: rolled back on command
    WINDOW_CLOSED = "window_closed"  # the rollout's end time passed before the device was offered
    OFFLINE = "offline"  # the device stayed offline until the rollout's end time


class Stage(StrEnum):
    """What the desired document asks for: fetch + verify only, or install the verified image."""

    DOWNLOAD = "download"
    INSTALL = "install"
    SOAK = "soak"  # installed and running: report health every ``heartbeat_s`` until told otherwise
    ROLLBACK = "rollback"  # unhealthy after the update: go back to the previous slot
    CANCEL = "cancel"  # an operator stopped this update: drop it unless already installing


# ---------------------------------------------------------------- payloads
class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_payload(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class FirmwareRef(_Message):
    model: str
    version: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(description="base64 ed25519 signature over canonical_manifest()")
    url: str
    token: str = Field(description="bearer token for the download URL")


class Desired(_Message):
    """Retained on ``desired``: the update the device should be doing now."""

    update_id: int = Field(ge=1)
    attempt: int = Field(ge=1)
    stage: Stage
    firmware: FirmwareRef
    heartbeat_s: float | None = Field(None, gt=0, description="stage soak: seconds between health reports")
    install_before: float | None = Field(
        None, ge=0, description="stage install: unix time after which not to begin installing (window closes)"
    )


class Health(_Message):
    """A device's health, carried by the reports it sends while an update soaks."""

    boot_count: Annotated[StrictInt, Field(ge=0, le=MAX_ID)]
    uptime_s: float = Field(ge=0, le=1e10, allow_inf_nan=False)
    app_healthy: bool


class Report(_Message):
    """Published on ``report``. ``seq`` rises monotonically per device across reboots.

    Every field is bounded to what the database stores: a report outside them is rejected whole.
    """

    update_id: Id
    attempt: Annotated[StrictInt, Field(ge=1, le=MAX_ATTEMPT)]
    state: ReportState
    seq: Annotated[StrictInt, Field(ge=0, le=MAX_ID)]
    progress: Annotated[StrictInt, Field(ge=0, le=100)] = 0
    running_version: ShortText
    error: ErrorCode | None = None
    detail: str | None = Field(default=None, max_length=500)
    ts: float | None = Field(default=None, allow_inf_nan=False, ge=0, le=1e11)
    health: Health | None = None  # heartbeats during a soak (state SUCCEEDED)


class DeviceInfo(_Message):
    """Retained on ``info``."""

    model: ShortText
    running_version: ShortText
    slot: Literal["a", "b"] = "a"
    agent_version: ShortText = "unknown"
    labels: dict[ShortText, Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=dict, max_length=32
    )


class PortalDevice(_Message):
    """Retained on ``portal/rollouts/{rollout}/devices/{device}``."""

    device_id: str
    update_id: int
    state: str
    attempt: int
    progress: int = 0
    error: str | None = None
    running_version: str | None = None
    ts: float


class PortalRollout(_Message):
    """Retained on ``portal/rollouts/{rollout}``."""

    rollout_id: int
    name: str
    status: str
    total: int
    counts: dict[str, int]
    percent: float
    current_wave: int | None = None
    waves: list[dict[str, Any]] = Field(default_factory=list)
    eta_seconds: float | None = None
    skipped: dict[str, int] = Field(default_factory=dict)  # SKIPPED devices by reason
    pacing: dict[str, Any] | None = None  # rate, windows, offline waiting (orchestrator.pacing)
    ts: float


# ---------------------------------------------------------------- firmware manifest
def canonical_manifest(model: str, version: str, size: int, sha256: str) -> bytes:
    """The exact bytes an ed25519 firmware signature covers."""
    doc = {"model": model, "sha256": sha256, "size": size, "version": version}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def verify_manifest_signature(public_key: Ed25519PublicKey, firmware: FirmwareRef) -> bool:
    """True when ``firmware.signature`` is a valid signature of its manifest under ``public_key``."""
    try:
        signature = base64.b64decode(firmware.signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    manifest = canonical_manifest(firmware.model, firmware.version, firmware.size, firmware.sha256)
    try:
        public_key.verify(signature, manifest)
    except InvalidSignature:
        return False
    return True
