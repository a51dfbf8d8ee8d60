"""Request and response bodies of the HTTP API (the OpenAPI schema at /docs is generated from these)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from orchestrator.policy import DeviceFilter, RolloutPolicy, Target
from orchestrator.protocol import DEVICE_ID_PATTERN
from orchestrator.services.device_service import (
    LABEL_KEY_PATTERN,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_TAGGED_AT_ONCE,
    MAX_TAGS,
    NAME_PATTERN,
    TAG_PATTERN,
)

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN), Field(examples=["sensor-000042"])]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
Tag = Annotated[str, StringConstraints(pattern=TAG_PATTERN), Field(examples=["pilot"])]
# No control characters: PostgreSQL refuses NUL in text, and labels end up in logs and UIs.
LabelValue = Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE, pattern=r"^[^\x00-\x1f\x7f]*$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_NAME = re.compile(NAME_PATTERN)
_TAG = re.compile(TAG_PATTERN)
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)


class ErrorBody(BaseModel):
    """Every 4xx and 5xx response: a stable code, a message for humans, and the offending field."""

    code: str = Field(examples=["not_found"])
    message: str = Field(examples=["rollout 7 does not exist"])
    field: str | None = Field(None, examples=["rollout_id"])


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# ---------------------------------------------------------------- devices
class DeviceCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "sensor-000042",
                    "model": "sensor-v2",
                    "firmware_version": "1.0.0",
                    "labels": {"site": "berlin", "ring": "beta"},
                }
            ]
        },
    )

    id: DeviceId
    model: Name = Field(examples=["sensor-v2"])
    firmware_version: Name = Field(examples=["1.0.0"])
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS)
    protocol: Literal["fleet", "aws-jobs"] = Field(
        "fleet", description="fleet: fleet's device agent; aws-jobs: the AWS IoT Jobs MQTT API"
    )


class DeviceOut(_Out):
    id: str = Field(examples=["sensor-000042"])
    model: str = Field(examples=["sensor-v2"])
    firmware_version: str = Field(examples=["1.0.0"], description="the version the device last reported")
    labels: dict[str, Any] = Field(examples=[{"site": "berlin"}], description="what the device reports")
    tags: list[str] = Field(default_factory=list, examples=[["pilot"]], description="set by operators")
    online: bool
    slot: str | None = Field(None, examples=["a"])
    agent_version: str | None = None
    protocol: str = Field("fleet", examples=["fleet"], description="fleet or aws-jobs")
    last_seen: datetime | None = None
    created_at: datetime


class DeviceHistoryItem(BaseModel):
    """The device's update inside one rollout."""

    update_id: int
    rollout_id: int
    rollout_name: str
    rollout_status: str = Field(examples=["RUNNING"])
    firmware_id: int
    firmware_version: str = Field(examples=["1.1.0"])
    state: str = Field(examples=["SUCCEEDED"])
    attempt: int
    progress: int
    error_code: str | None = None
    offered_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime


class DeviceDetail(DeviceOut):
    updates: list[DeviceHistoryItem] = Field(description="updates across rollouts, newest first")
    events: list[EventOut] = Field(
        default_factory=list, description="latest events of the device, newest first"
    )


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last")


class TagChange(BaseModel):
    """Operator tags to add and to remove (removal wins when a tag is in both)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"add": ["pilot"], "remove": []}]}
    )

    add: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    remove: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)


class BulkTagChange(TagChange):
    device_ids: list[DeviceId] = Field(min_length=1, max_length=MAX_TAGGED_AT_ONCE)


class TagResult(BaseModel):
    devices: int = Field(description="devices the change was applied to")


# ---------------------------------------------------------------- groups
class GroupFilter(DeviceFilter):
    """A saved group's filter: every given part must match."""

    @field_validator("model")
    @classmethod
    def _model_name(cls, model: str | None) -> str | None:
        if model is not None and not _NAME.match(model):
            raise ValueError(f"model must match {NAME_PATTERN}")
        return model

    @field_validator("tags")
    @classmethod
    def _tag_names(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not _TAG.match(tag):
                raise ValueError(f"tag {tag[:70]!r} must match {TAG_PATTERN}")
        return tags

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if not _LABEL_KEY.match(key):
                raise ValueError(f"label key {key[:70]!r} must match {LABEL_KEY_PATTERN}")
        return labels


class GroupCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "berlin-pilot", "filter": {"model": "sensor-v2", "tags": ["pilot"]}}]
        },
    )

    name: Name = Field(examples=["berlin-pilot"])
    filter: GroupFilter


class GroupOut(BaseModel):
    name: str
    filter: dict[str, Any]
    created_at: datetime
    devices: int = Field(description="devices the filter selects now")


# ---------------------------------------------------------------- firmware
class FirmwareOut(_Out):
    id: int
    model: str = Field(examples=["sensor-v2"])
    version: str = Field(examples=["1.1.0"])
    size: int = Field(examples=[200003])
    sha256: str = Field(examples=["1e2b8f483a5411a9536365c42df6a2d9e2799c5f2269f0e72d9031db57140fe9"])
    signature: str = Field(description="base64 ed25519 signature over the canonical manifest")
    created_at: datetime
    deprecated_at: datetime | None = Field(None, description="set: no new rollout may use it")


class FirmwarePage(BaseModel):
    items: list[FirmwareOut]
    next_cursor: str | None = None


# ---------------------------------------------------------------- rollouts
class RolloutCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "sensor-v2 1.1.0 to berlin",
                    "firmware_id": 1,
                    "target": {"model": "sensor-v2", "labels": {"site": "berlin"}},
                    "policy": {
                        "waves": ["1%", "10%", "100%"],
                        "success_threshold": 0.95,
                        "max_in_flight": 500,
                    },
                },
                {"name": "two devices", "firmware_id": 1, "target": {"device_ids": ["dev-1", "dev-2"]}},
            ]
        },
    )

    name: Text
    firmware_id: int = Field(ge=1, le=2**31 - 1)
    target: Target
    policy: RolloutPolicy = Field(default_factory=RolloutPolicy)
    start_at: AwareDatetime | None = Field(
        None, description="start later (the reconciler starts it); omitted or past: start now"
    )
    supersede: bool = Field(
        False,
        description="devices with an unfinished update in another rollout: cancel it there where it has "
        "not started (started ones finish first); without this such devices answer 409",
    )

    @field_validator("target")
    @classmethod
    def _well_formed_target(cls, target: Target) -> Target:
        for device_id in target.device_ids or ():
            if not _DEVICE_ID.match(device_id):
                raise ValueError(f"device id {device_id[:140]!r} must match {DEVICE_ID_PATTERN}")
        if target.model is not None and not _NAME.match(target.model):
            raise ValueError(f"model must match {NAME_PATTERN}")
        if target.group is not None and not _NAME.match(target.group):
            raise ValueError(f"group must match {NAME_PATTERN}")
        GroupFilter.model_validate(target.model_dump(include={"model", "tags", "labels"}))
        return target


class RolloutOut(_Out):
    id: int
    name: str
    firmware_id: int
    status: str = Field(examples=["RUNNING"], description="SCHEDULED RUNNING PAUSED COMPLETED HALTED ABORTED")
    target: dict[str, Any] = Field(examples=[{"model": "sensor-v2", "labels": {"site": "berlin"}}])
    policy: dict[str, Any] = Field(description="RolloutPolicy as stored")
    total: int = Field(description="devices selected, including the skipped ones")
    current_wave: int | None = None
    reason: str | None = Field(None, description="why it halted or was aborted")
    start_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class Pacing(BaseModel):
    """What holds a running rollout back right now: its rate, its windows, offline devices."""

    rate_per_minute: int | None = Field(None, description="offers per minute the ramp allows now")
    offered_last_minute: int = 0
    window_open: bool | None = Field(None, description="null: the policy has no windows")
    window_closes_at: datetime | None = None
    next_window_at: datetime | None = None
    waiting_for_window: int = Field(0, description="verified devices waiting for a window to install")
    waiting_offline: int = Field(0, description="queued devices that are offline")
    soaking: int = Field(0, description="devices reporting health in their soak")
    end_at: datetime | None = None
    continuous: bool = False


class WaveProgress(BaseModel):
    index: int
    status: str = Field(examples=["RUNNING"])
    size: int
    done: int = Field(description="devices of the wave in an end state")
    succeeded: int
    started_at: datetime | None = Field(None, description="when the wave opened")
    finished_at: datetime | None = Field(None, description="when its gate passed or failed")


class ProgressPointOut(BaseModel):
    at: datetime = Field(description="end of the time bucket")
    succeeded: int = Field(description="updates succeeded so far")
    failed: int = Field(description="updates failed, timed out or rolled back so far")
    in_flight: int = Field(description="updates offered and not yet ended at that moment")


class ProgressHistoryOut(BaseModel):
    bucket_s: int = Field(description="seconds between points (widened so a chart has at most 240)")
    points: list[ProgressPointOut]


class RolloutDetail(RolloutOut):
    counts: dict[str, int] = Field(examples=[{"SUCCEEDED": 120, "DOWNLOADING": 30, "PENDING": 850}])
    percent: float = Field(description="share of device updates in an end state")
    waves: list[WaveProgress]
    eta_seconds: float | None = Field(None, description="naive estimate from the rate so far")
    skipped: dict[str, int] = Field(
        default_factory=dict, examples=[{"already_on_target": 3, "offline": 1}], description="skips by reason"
    )
    pacing: Pacing | None = None


class RolloutPage(BaseModel):
    items: list[RolloutOut]
    next_cursor: str | None = None


class DeviceUpdateOut(BaseModel):
    id: int
    device_id: str
    wave_index: int | None = Field(None, description="null for devices skipped at planning")
    state: str = Field(examples=["DOWNLOADING"])
    attempt: int
    progress: int
    error_code: str | None = None
    offered_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    stop_requested_at: datetime | None = Field(None, description="an operator asked the device to stop")
    running_version: str | None = Field(None, description="the version the device last reported")
    online: bool | None = None


class DeviceUpdatePage(BaseModel):
    items: list[DeviceUpdateOut]
    next_cursor: str | None = None


class EventOut(_Out):
    id: int
    created_at: datetime
    kind: str = Field(examples=["transition"], description="transition | report | operator | inventory")
    name: str = Field(examples=["report_verified"])
    rollout_id: int | None = None
    wave_id: int | None = None
    device_update_id: int | None = None
    device_id: str | None = None
    from_state: str | None = None
    to_state: str | None = None
    attempt: int | None = None
    seq: int | None = None
    accepted: bool
    detail: dict[str, Any] | None = None


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None = None


# ---------------------------------------------------------------- webhooks
class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"url": "https://hooks.example.com/fleet", "events": ["rollout", "device_update"]}]
        },
    )

    url: str = Field(max_length=2048, examples=["https://hooks.example.com/fleet"])
    events: list[str] = Field(
        min_length=1, max_length=2, description="rollout and/or device_update: their state changes"
    )
    description: Text | None = None


class WebhookOut(_Out):
    id: int
    url: str
    events: list[str]
    description: str | None = None
    active: bool
    created_by: str
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="signs every delivery (Fleet-Signature: t=…,v1=HMAC-SHA256(secret, t.body)); "
        "shown only now"
    )


class WebhookDeliveryOut(_Out):
    id: int
    event_id: int
    kind: str = Field(examples=["device_update.state"])
    payload: dict[str, Any]
    status: str = Field(examples=["DELIVERED"], description="PENDING | DELIVERED | FAILED")
    attempts: int
    last_status: int | None = None
    last_error: str | None = None
    next_attempt_at: datetime
    delivered_at: datetime | None = None
    created_at: datetime


class WebhookDeliveryPage(BaseModel):
    items: list[WebhookDeliveryOut]
    next_cursor: str | None = None


# ---------------------------------------------------------------- audit
class AuditOut(_Out):
    id: int
    created_at: datetime
    actor: str = Field(
        examples=["api:ops-alice"], description="api:<token name>, cli:<user>, system, scheduler"
    )
    token_name: str | None = None
    role: str | None = Field(None, examples=["operator"])
    action: str = Field(examples=["rollout.pause"])
    target_kind: str | None = Field(None, examples=["rollout"])
    target_id: str | None = Field(None, examples=["7"])
    outcome: str = Field(examples=["ok"], description="ok, or the error code the action ended with")
    status: int | None = Field(None, description="HTTP status, for actions taken through the API")
    detail: dict[str, Any] | None = None


class AuditPage(BaseModel):
    items: list[AuditOut]
    next_cursor: str | None = None


# ---------------------------------------------------------------- health
class Health(BaseModel):
    status: str = Field(examples=["ok"], description="ok | degraded")
    checks: dict[str, str] = Field(examples=[{"database": "ok", "redis": "ok", "mqtt": "ok"}])


_ERROR_TEXT = {
    400: "the body cannot be parsed (e.g. broken multipart framing)",
    401: "no API token, or an unknown or revoked one",
    403: "the token's role does not allow this",
    404: "no such object",
    409: "conflicts with the current state (duplicate, illegal transition, concurrent change)",
    413: "body larger than FLEET_MAX_FIRMWARE_BYTES (uploads) or FLEET_MAX_REQUEST_BYTES (anything else)",
    416: "the Range header is not one byte range inside the image",
    422: "invalid input; `field` names the parameter",
    503: "a dependency is unavailable",
}


def errors(*statuses: int, json_content: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses, all with the ErrorBody schema.

    ``json_content`` spells the JSON media type out, for routes whose success response is not JSON
    (FastAPI would otherwise document the errors under the route's media type).
    """
    if json_content:
        schema = {"$ref": "#/components/schemas/ErrorBody"}
        return {
            status: {"description": _ERROR_TEXT[status], "content": {"application/json": {"schema": schema}}}
            for status in statuses
        }
    return {status: {"model": ErrorBody, "description": _ERROR_TEXT[status]} for status in statuses}
