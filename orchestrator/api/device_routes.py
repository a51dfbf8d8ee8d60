"""Device inventory: register, list with filters, one device with its update history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from orchestrator.api.deps import DbSession, Operator, Viewer, actor
from orchestrator.api.schemas import (
    BulkTagChange,
    DeviceCreate,
    DeviceDetail,
    DeviceHistoryItem,
    DeviceOut,
    DevicePage,
    EventOut,
    Name,
    Tag,
    TagChange,
    TagResult,
    errors,
)
from orchestrator.protocol import DEVICE_ID_PATTERN
from orchestrator.services import device_service, query_service
from orchestrator.services.query_service import MAX_LIMIT

router = APIRouter(prefix="/devices", tags=["devices"], responses=errors(401, 403, 422))
DevicePath = Annotated[str, Path(pattern=DEVICE_ID_PATTERN, description="device id")]


@router.post("", status_code=201, response_model=DeviceOut, responses=errors(400, 409))
def register_device(body: DeviceCreate, session: DbSession, token: Operator) -> DeviceOut:
    """Register a device before it first connects (it shows as offline until then).

    409 when the id is registered already. Devices also register themselves over MQTT.
    """
    device = device_service.register_device(
        session,
        device_id=body.id,
        model=body.model,
        firmware_version=body.firmware_version,
        labels=body.labels,
        actor=actor(token),
        protocol=body.protocol,
    )
    return DeviceOut.model_validate(device)


@router.get("", response_model=DevicePage)
def list_devices(
    session: DbSession,
    _: Viewer,
    model: Annotated[Name | None, Query(description="hardware model, e.g. sensor-v2")] = None,
    version: Annotated[Name | None, Query(description="running firmware version")] = None,
    label: Annotated[
        list[str],
        Query(
            max_length=32,
            description="`key:value`, repeatable; a device must carry every given label "
            "(split at the first ':'; keys are letters, digits and `._/-`)",
            examples=[["site:berlin", "ring:beta"]],
        ),
    ] = [],  # noqa: B006 - FastAPI copies query defaults
    online: Annotated[bool | None, Query(description="only online (true) or offline (false) devices")] = None,
    tag: Annotated[
        list[Tag], Query(max_length=20, description="operator tag, repeatable; a device must carry every one")
    ] = [],  # noqa: B006 - FastAPI copies query defaults
    q: Annotated[str | None, Query(min_length=1, max_length=128, description="part of the device id")] = None,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> DevicePage:
    """Devices ordered by id, filtered; cursor pagination (``next_cursor`` is null on the last page)."""
    page = query_service.list_devices(
        session,
        model=model,
        version=version,
        labels=query_service.parse_label_filters(label),
        online=online,
        tags=tag,
        search=q,
        cursor=cursor,
        limit=limit,
    )
    return DevicePage(items=[DeviceOut.model_validate(d) for d in page.items], next_cursor=page.next_cursor)


@router.post("/tags", response_model=TagResult, responses=errors(400, 404))
def tag_devices(body: BulkTagChange, session: DbSession, token: Operator) -> TagResult:
    """Add and remove operator tags on many devices at once (all or none: 404 if one is unknown).

    Tags belong to operators; labels are what devices report about themselves and never touch them.
    """
    devices = device_service.set_tags(
        session, body.device_ids, add=body.add, remove=body.remove, actor=actor(token)
    )
    return TagResult(devices=len(devices))


@router.patch("/{device_id}/tags", response_model=DeviceOut, responses=errors(400, 404))
def tag_device(device_id: DevicePath, body: TagChange, session: DbSession, token: Operator) -> DeviceOut:
    """Add and remove operator tags on one device; returns the device."""
    (device,) = device_service.set_tags(
        session, [device_id], add=body.add, remove=body.remove, actor=actor(token)
    )
    return DeviceOut.model_validate(device)


@router.get("/{device_id}", response_model=DeviceDetail, responses=errors(404))
def get_device(
    device_id: DevicePath,
    session: DbSession,
    _: Viewer,
    history: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="at most this many updates")] = 20,
    events: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="at most this many events")] = 50,
) -> DeviceDetail:
    """One device, its updates across rollouts and its latest events (its timeline), newest first."""
    device, entries = query_service.device_history(session, device_id, limit=history)
    timeline = query_service.device_events(session, device_id, limit=events)
    updates = [
        DeviceHistoryItem(
            update_id=e.update.id,
            rollout_id=e.update.rollout_id,
            rollout_name=e.rollout_name,
            rollout_status=e.rollout_status,
            firmware_id=e.firmware_id,
            firmware_version=e.firmware_version,
            state=str(e.update.state),
            attempt=e.update.attempt,
            progress=e.update.progress,
            error_code=e.update.error_code,
            offered_at=e.update.offered_at,
            finished_at=e.update.finished_at,
            updated_at=e.update.updated_at,
        )
        for e in entries
    ]
    return DeviceDetail(
        **DeviceOut.model_validate(device).model_dump(),
        updates=updates,
        events=[EventOut.model_validate(e) for e in timeline],
    )
