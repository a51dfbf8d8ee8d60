"""Read side for the API: filtered listings with cursor pagination, details and counters.

Cursors are opaque to clients: URL-safe base64 of ``[scope, last key]``. A cursor only works for
the listing that issued it (another listing's cursor is InvalidInput on ``cursor``). Keyset
pagination keeps every page an index range scan, however deep the client pages.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import String, cast, func, select
from sqlalchemy.orm import Session

from orchestrator.errors import InvalidInput, NotFound
from orchestrator.models import (
    AuditEntry,
    Device,
    DeviceUpdate,
    Event,
    Firmware,
    Rollout,
    Wave,
    WebhookDelivery,
)
from orchestrator.portal import rollout_summary
from orchestrator.protocol import PortalRollout
from orchestrator.services.device_service import LABEL_KEY_PATTERN, get_device
from orchestrator.services.rollout_service import get_rollout
from orchestrator.state_machines import RolloutState, UpdateState

T = TypeVar("T")
MAX_LIMIT = 1000
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; ``next_cursor`` is None on the last page."""

    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class UpdateRow:
    """A device update with the index of its wave (None for devices skipped at planning)."""

    update: DeviceUpdate
    wave_index: int | None
    running_version: str | None = None
    online: bool | None = None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One rollout's update of a device, with what the rollout was about."""

    update: DeviceUpdate
    rollout_name: str
    rollout_status: str
    firmware_id: int
    firmware_version: str


# ---------------------------------------------------------------- cursors
def encode_cursor(scope: str, key: str | int) -> str:
    raw = json.dumps([scope, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(scope: str, cursor: str | None, key_type: type[T]) -> T | None:
    """The key a cursor from :func:`encode_cursor` carries; None for no cursor.

    Raises InvalidInput (field ``cursor``) for anything not issued by the same listing.
    """
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        found_scope, key = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise InvalidInput(
            "cursor is not valid; pass next_cursor from a previous page", field="cursor"
        ) from None
    if found_scope != scope or not isinstance(key, key_type) or not _plausible_key(key):
        raise InvalidInput(f"cursor was not issued by the {scope} listing", field="cursor")
    return key


def _plausible_key(key: object) -> bool:
    """Keys the database can compare against: 64-bit ids, ids without NUL (PostgreSQL refuses it)."""
    if isinstance(key, bool):
        return False
    if isinstance(key, int):
        return 0 <= key < 2**63
    return isinstance(key, str) and len(key) <= 256 and "\x00" not in key


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}", field="limit")


def _page(rows: Sequence[T], limit: int, scope: str, key: Any) -> Page[T]:
    """Cut the ``limit + 1`` rows a query returned into a page and the cursor of the next one."""
    items = list(rows[:limit])
    more = len(rows) > limit
    return Page(items, encode_cursor(scope, key(items[-1])) if more and items else None)


# ---------------------------------------------------------------- devices
def parse_label_filters(specs: Sequence[str]) -> dict[str, str]:
    """``["site:berlin", "ring:beta"]`` -> ``{"site": "berlin", "ring": "beta"}`` (split at the first ':')."""
    labels: dict[str, str] = {}
    for spec in specs:
        key, sep, value = spec.partition(":")
        if not sep or not _LABEL_KEY.match(key):
            raise InvalidInput(
                f"label filter {spec!r} must be key:value with a key matching {LABEL_KEY_PATTERN}",
                field="label",
            )
        labels[key] = value
    return labels


def _device_filters(
    query: Any,
    *,
    model: str | None = None,
    version: str | None = None,
    labels: dict[str, str] | None = None,
    online: bool | None = None,
    tags: list[str] | None = None,
    search: str | None = None,
) -> Any:
    """``query`` (which selects from or joins ``devices``) narrowed by every given device filter."""
    if model is not None:
        query = query.where(Device.model == model)
    if version is not None:
        query = query.where(Device.firmware_version == version)
    if online is not None:
        query = query.where(Device.online.is_(online))
    for key, value in (labels or {}).items():
        if not _LABEL_KEY.match(key):
            raise InvalidInput(f"label key {key!r} must match {LABEL_KEY_PATTERN}", field="label")
        query = query.where(Device.labels[key].as_string() == value)
    for tag in tags or ():
        if not _LABEL_KEY.match(tag):
            raise InvalidInput(f"tag {tag[:70]!r} must match {LABEL_KEY_PATTERN}", field="tag")
        # The JSON text holds each tag in quotes, and the pattern admits no quote: a portable test.
        query = query.where(cast(Device.tags, String).contains(f'"{tag}"', autoescape=True))
    if search:
        query = query.where(Device.id.contains(search, autoescape=True))
    return query


def list_devices(
    session: Session,
    *,
    model: str | None = None,
    version: str | None = None,
    labels: dict[str, str] | None = None,
    online: bool | None = None,
    tags: list[str] | None = None,
    search: str | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> Page[Device]:
    """Devices ordered by id, matching every given filter (labels: all pairs must match).

    Preconditions: 1 <= limit <= MAX_LIMIT; label keys match LABEL_KEY_PATTERN.
    """
    _check_limit(limit)
    after = decode_cursor("devices", cursor, str)
    query = select(Device).order_by(Device.id).limit(limit + 1)
    if after is not None:
        query = query.where(Device.id > after)
    query = _device_filters(
        query, model=model, version=version, labels=labels, online=online, tags=tags, search=search
    )
    return _page(session.scalars(query).all(), limit, "devices", lambda d: d.id)


def device_events(session: Session, device_id: str, *, limit: int = 50) -> list[Event]:
    """The device's latest events (reports, transitions, operator and inventory), newest first."""
    _check_limit(limit)
    return list(
        session.scalars(
            select(Event).where(Event.device_id == device_id).order_by(Event.id.desc()).limit(limit)
        )
    )


def device_history(session: Session, device_id: str, *, limit: int = 20) -> tuple[Device, list[HistoryEntry]]:
    """The device and its updates across rollouts, newest first, at most ``limit`` (1..MAX_LIMIT)."""
    _check_limit(limit)
    device = get_device(session, device_id)
    rows = session.execute(
        select(DeviceUpdate, Rollout.name, Rollout.status, Firmware.id, Firmware.version)
        .join(Rollout, Rollout.id == DeviceUpdate.rollout_id)
        .join(Firmware, Firmware.id == Rollout.firmware_id)
        .where(DeviceUpdate.device_id == device_id)
        .order_by(DeviceUpdate.id.desc())
        .limit(limit)
    ).tuples()
    return device, [
        HistoryEntry(du, name, str(status), fw_id, fw_version) for du, name, status, fw_id, fw_version in rows
    ]


# ---------------------------------------------------------------- firmware
def list_firmware(
    session: Session, *, model: str | None = None, cursor: str | None = None, limit: int = 100
) -> Page[Firmware]:
    """Firmware images ordered by id (upload order), optionally of one model."""
    _check_limit(limit)
    after = decode_cursor("firmware", cursor, int)
    query = select(Firmware).order_by(Firmware.id).limit(limit + 1)
    if after is not None:
        query = query.where(Firmware.id > after)
    if model is not None:
        query = query.where(Firmware.model == model)
    return _page(session.scalars(query).all(), limit, "firmware", lambda f: f.id)


# ---------------------------------------------------------------- rollouts
def list_rollouts(
    session: Session, *, status: RolloutState | None = None, cursor: str | None = None, limit: int = 100
) -> Page[Rollout]:
    """Rollouts newest first, optionally in one status."""
    _check_limit(limit)
    after = decode_cursor("rollouts", cursor, int)
    query = select(Rollout).order_by(Rollout.id.desc()).limit(limit + 1)
    if after is not None:
        query = query.where(Rollout.id < after)
    if status is not None:
        query = query.where(Rollout.status == status)
    return _page(session.scalars(query).all(), limit, "rollouts", lambda r: r.id)


def rollout_detail(session: Session, rollout_id: int) -> tuple[Rollout, PortalRollout]:
    """The rollout and its progress summary (counts per state, waves, percent, ETA); NotFound if absent."""
    rollout = get_rollout(session, rollout_id)
    summary = rollout_summary(session, rollout_id)
    if summary is None:  # deleted between the two reads
        raise NotFound(f"rollout {rollout_id} does not exist", field="rollout_id")
    return rollout, summary


def list_rollout_updates(
    session: Session,
    rollout_id: int,
    *,
    state: UpdateState | None = None,
    error_code: str | None = None,
    model: str | None = None,
    version: str | None = None,
    online: bool | None = None,
    tags: list[str] | None = None,
    search: str | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> Page[UpdateRow]:
    """A rollout's device updates ordered by device id, filtered by the update's state and error
    and by the device's model, running version, presence, tags and id; NotFound if no rollout."""
    _check_limit(limit)
    get_rollout(session, rollout_id)
    after = decode_cursor(f"rollout-{rollout_id}-devices", cursor, str)
    query = (
        select(DeviceUpdate, Wave.index, Device.firmware_version, Device.online)
        .outerjoin(Wave, Wave.id == DeviceUpdate.wave_id)
        .join(Device, Device.id == DeviceUpdate.device_id)
        .where(DeviceUpdate.rollout_id == rollout_id)
        .order_by(DeviceUpdate.device_id)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(DeviceUpdate.device_id > after)
    if state is not None:
        query = query.where(DeviceUpdate.state == state)
    if error_code is not None:
        query = query.where(DeviceUpdate.error_code == error_code)
    if any(v is not None for v in (model, version, online, search)) or tags:
        query = _device_filters(
            query,
            model=model,
            version=version,
            online=online,
            tags=tags,
            search=search,
        )
    rows = [
        UpdateRow(du, index, running, online)
        for du, index, running, online in session.execute(query).tuples()
    ]
    return _page(rows, limit, f"rollout-{rollout_id}-devices", lambda r: r.update.device_id)


def list_rollout_events(
    session: Session, rollout_id: int, *, cursor: str | None = None, limit: int = 100
) -> Page[Event]:
    """A rollout's events newest first (by id); NotFound if no rollout."""
    _check_limit(limit)
    get_rollout(session, rollout_id)
    after = decode_cursor(f"rollout-{rollout_id}-events", cursor, int)
    query = select(Event).where(Event.rollout_id == rollout_id).order_by(Event.id.desc()).limit(limit + 1)
    if after is not None:
        query = query.where(Event.id < after)
    return _page(session.scalars(query).all(), limit, f"rollout-{rollout_id}-events", lambda e: e.id)


# ---------------------------------------------------------------- counters
def rollouts_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Rollout.status, func.count()).group_by(Rollout.status)).tuples()
    return {str(status): count for status, count in rows}


def updates_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(DeviceUpdate.state, func.count()).group_by(DeviceUpdate.state)).tuples()
    return {str(state): count for state, count in rows}


def active_updates_by_rollout(session: Session) -> list[tuple[int, str, str, int]]:
    """(rollout id, rollout name, update state, count) over rollouts that are running or paused."""
    rows = session.execute(
        select(Rollout.id, Rollout.name, DeviceUpdate.state, func.count())
        .join(DeviceUpdate, DeviceUpdate.rollout_id == Rollout.id)
        .where(Rollout.status.in_(("RUNNING", "PAUSED")))
        .group_by(Rollout.id, Rollout.name, DeviceUpdate.state)
        .order_by(Rollout.id)
    ).tuples()
    return [(int(rid), str(name), str(state), int(count)) for rid, name, state, count in rows]


def webhook_deliveries_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
    ).tuples()
    return {str(status): count for status, count in rows}


def devices_by_online(session: Session) -> dict[bool, int]:
    rows = session.execute(select(Device.online, func.count()).group_by(Device.online)).tuples()
    return {bool(online): count for online, count in rows}


# ---------------------------------------------------------------- audit
def list_audit(
    session: Session,
    *,
    action: str | None = None,
    actor: str | None = None,
    target_kind: str | None = None,
    target_id: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> Page[AuditEntry]:
    """Audit entries newest first, matching every given filter (``action`` may end in ``.*``)."""
    _check_limit(limit)
    after = decode_cursor("audit", cursor, int)
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit + 1)
    if after is not None:
        query = query.where(AuditEntry.id < after)
    if action is not None:
        if action.endswith(".*"):
            query = query.where(AuditEntry.action.startswith(action[:-1], autoescape=True))
        else:
            query = query.where(AuditEntry.action == action)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if target_kind is not None:
        query = query.where(AuditEntry.target_kind == target_kind)
    if target_id is not None:
        query = query.where(AuditEntry.target_id == target_id)
    if outcome is not None:
        query = query.where(AuditEntry.outcome == outcome)
    if since is not None:
        query = query.where(AuditEntry.created_at >= since)
    if until is not None:
        query = query.where(AuditEntry.created_at < until)
    return _page(session.scalars(query).all(), limit, "audit", lambda e: e.id)
