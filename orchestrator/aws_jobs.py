"""The device side of the AWS IoT Jobs MQTT API, as fleet serves it on its own broker.

A device of protocol ``aws-jobs`` named T (its thing name is its device id) talks on
``$aws/things/T/jobs/...`` exactly as it would to AWS IoT: ``get``, ``start-next``,
``{jobId}/get`` and ``{jobId}/update``, each answered on ``/accepted`` or ``/rejected`` with the
request's ``clientToken``, plus the ``notify`` and ``notify-next`` notifications. One fleet
device update attempt is one job execution: ``jobId`` is ``fleet-{update_id}`` and
``executionNumber`` the attempt. docs/protocol.md has the field-by-field table.

This module is the wire format only: topics, request bounds, reply payloads and the mapping
between execution statuses and device-update states. Timestamps are epoch seconds, as on AWS.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from orchestrator.protocol import ErrorCode, ReportState
from orchestrator.state_machines import UpdateState

PROTOCOL = "aws-jobs"
JOBS_ROOT = "$aws/things"
JOB_ID_PREFIX = "fleet-"
# The requests a device sends; fleet's own replies and notifications never match these.
REQUEST_SUBSCRIPTIONS = (
    f"{JOBS_ROOT}/+/jobs/get",
    f"{JOBS_ROOT}/+/jobs/start-next",
    f"{JOBS_ROOT}/+/jobs/+/get",
    f"{JOBS_ROOT}/+/jobs/+/update",
)
_THING = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
_JOB_ID = re.compile(r"^(\$next|[a-zA-Z0-9_-]{1,64})$")
MAX_STEP_TIMEOUT_MIN = 10080


class JobStatus(StrEnum):
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    REJECTED = "REJECTED"
    REMOVED = "REMOVED"
    CANCELED = "CANCELED"


TERMINAL = frozenset(set(JobStatus) - {JobStatus.QUEUED, JobStatus.IN_PROGRESS})
DEVICE_SETTABLE = frozenset(
    {JobStatus.IN_PROGRESS, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.REJECTED}
)


class RejectCode(StrEnum):
    INVALID_TOPIC = "InvalidTopic"
    INVALID_JSON = "InvalidJson"
    INVALID_REQUEST = "InvalidRequest"
    INVALID_STATE_TRANSITION = "InvalidStateTransition"
    RESOURCE_NOT_FOUND = "ResourceNotFound"
    VERSION_MISMATCH = "VersionMismatch"
    INTERNAL_ERROR = "InternalError"
    REQUEST_THROTTLED = "RequestThrottled"
    TERMINAL_STATE_REACHED = "TerminalStateReached"


class Operation(StrEnum):
    GET_PENDING = "get"
    START_NEXT = "start-next"
    DESCRIBE = "describe"
    UPDATE = "update"


@dataclass(frozen=True)
class RequestTopic:
    thing: str
    operation: Operation
    job_id: str | None = None

    @property
    def reply_base(self) -> str:
        base = f"{JOBS_ROOT}/{self.thing}/jobs"
        if self.operation == Operation.GET_PENDING:
            return f"{base}/get"
        if self.operation == Operation.START_NEXT:
            return f"{base}/start-next"
        suffix = "get" if self.operation == Operation.DESCRIBE else "update"
        return f"{base}/{self.job_id}/{suffix}"


def parse_request_topic(topic: str) -> RequestTopic | None:
    """The request a topic names, or None (not a jobs request, or a malformed thing or job id)."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[:2] != ["$aws", "things"] or parts[3] != "jobs" or not _THING.match(parts[2]):
        return None
    rest = parts[4:]
    if rest == ["get"]:
        return RequestTopic(parts[2], Operation.GET_PENDING)
    if rest == ["start-next"]:
        return RequestTopic(parts[2], Operation.START_NEXT)
    if len(rest) == 2 and rest[1] in ("get", "update") and _JOB_ID.match(rest[0]):
        if rest[0] == "$next" and rest[1] == "update":
            return None
        operation = Operation.DESCRIBE if rest[1] == "get" else Operation.UPDATE
        return RequestTopic(parts[2], operation, rest[0])
    return None


def thing_of(topic: str) -> str | None:
    """The thing name of any ``$aws/things/T/jobs/...`` topic (for rate limits and ACL checks)."""
    parts = topic.split("/", 4)
    if len(parts) >= 4 and parts[:2] == ["$aws", "things"] and parts[3] == "jobs" and _THING.match(parts[2]):
        return parts[2]
    return None


def notify_topic(thing: str) -> str:
    return f"{JOBS_ROOT}/{thing}/jobs/notify"


def notify_next_topic(thing: str) -> str:
    return f"{JOBS_ROOT}/{thing}/jobs/notify-next"


def job_id_for(update_id: int) -> str:
    return f"{JOB_ID_PREFIX}{update_id}"


def update_id_of(job_id: str) -> int | None:
    if not job_id.startswith(JOB_ID_PREFIX) or not job_id[len(JOB_ID_PREFIX) :].isdigit():
        return None
    digits = job_id[len(JOB_ID_PREFIX) :]
    value = int(digits) if len(digits) <= 10 else 0
    return value if 0 < value < 2**31 else None  # device update ids are 32-bit on PostgreSQL


# ---------------------------------------------------------------- requests
_DetailKey = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9:_-]{1,128}$")]
_DetailValue = Annotated[
    str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f\x7f]*$")
]
_Token = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    clientToken: _Token | None = None


class GetPendingRequest(_Request):
    pass


class StartNextRequest(_Request):
    statusDetails: dict[_DetailKey, _DetailValue] | None = Field(None, max_length=32)
    stepTimeoutInMinutes: int | None = Field(None, ge=1, le=MAX_STEP_TIMEOUT_MIN)


class DescribeRequest(_Request):
    executionNumber: int | None = Field(None, ge=1)
    includeJobDocument: bool = True


class UpdateRequest(_Request):
    status: JobStatus
    statusDetails: dict[_DetailKey, _DetailValue] | None = Field(None, max_length=32)
    expectedVersion: int | None = Field(None, ge=0)
    executionNumber: int | None = Field(None, ge=1)
    includeJobExecutionState: bool = False
    includeJobDocument: bool = False
    stepTimeoutInMinutes: int | None = Field(None, ge=-1, le=MAX_STEP_TIMEOUT_MIN)

    @field_validator("stepTimeoutInMinutes")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("stepTimeoutInMinutes is -1 (cancel the step timer) or 1..10080")
        return value


REQUEST_MODELS: dict[Operation, type[_Request]] = {
    Operation.GET_PENDING: GetPendingRequest,
    Operation.START_NEXT: StartNextRequest,
    Operation.DESCRIBE: DescribeRequest,
    Operation.UPDATE: UpdateRequest,
}


def client_token_of(payload: bytes) -> str | None:
    """The clientToken of a request that failed validation, so its rejection still reaches it."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    token = doc.get("clientToken") if isinstance(doc, dict) else None
    return token if isinstance(token, str) and 0 < len(token) <= 64 else None


# ---------------------------------------------------------------- replies
def epoch(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def reply(body: dict[str, Any], client_token: str | None, now: float) -> bytes:
    """A reply or notification: None fields left out, ``timestamp`` in epoch seconds."""
    out = {k: v for k, v in body.items() if v is not None}
    out["timestamp"] = int(now)
    if client_token is not None:
        out["clientToken"] = client_token
    return json.dumps(out, separators=(",", ":")).encode()


def rejection(
    code: RejectCode,
    message: str,
    client_token: str | None,
    now: float,
    execution_state: dict[str, Any] | None = None,
) -> bytes:
    return reply(
        {"code": str(code), "message": message, "executionState": execution_state}, client_token, now
    )


def job_document(firmware: dict[str, Any], update_id: int, attempt: int) -> dict[str, Any]:
    """What a job execution asks of the device (docs/protocol.md): install ``firmware``."""
    return {
        "operation": "fleet.firmware-update",
        "update_id": update_id,
        "attempt": attempt,
        "firmware": firmware,
    }


def summary(
    update_id: int,
    attempt: int,
    version: int,
    queued_at: datetime | None,
    started_at: datetime | None,
    updated_at: datetime | None,
) -> dict[str, Any]:
    """A JobExecutionSummary (None fields are left out when serialized)."""
    return {
        "jobId": job_id_for(update_id),
        "queuedAt": epoch(queued_at),
        "startedAt": epoch(started_at),
        "lastUpdatedAt": epoch(updated_at),
        "versionNumber": version,
        "executionNumber": attempt,
    }


def execution(
    summary_doc: dict[str, Any],
    thing: str,
    status: JobStatus | None,
    details: dict[str, Any],
    document: dict[str, Any] | None,
) -> dict[str, Any]:
    """A JobExecution: its summary plus thing, status, statusDetails and (optionally) the document."""
    body = {**summary_doc, "thingName": thing, "status": str(status), "statusDetails": dict(details)}
    if document is not None:
        body["jobDocument"] = document
    return body


def _compact(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v is not None}


def notices(
    thing: str,
    now: float,
    queued: list[dict[str, Any]],
    in_progress: list[dict[str, Any]],
    nxt: dict[str, Any] | None,
) -> list[tuple[str, bytes]]:
    """(notify, notify-next) messages: the pending lists, and the next execution (or none)."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    if in_progress:
        jobs[str(JobStatus.IN_PROGRESS)] = [_compact(s) for s in in_progress]
    if queued:
        jobs[str(JobStatus.QUEUED)] = [_compact(s) for s in queued]
    return [
        (notify_topic(thing), reply({"jobs": jobs}, None, now)),
        (notify_next_topic(thing), reply({"execution": _compact(nxt) if nxt else None}, None, now)),
    ]


# ---------------------------------------------------------------- fleet <-> AWS
_IN_PROGRESS = {
    UpdateState.DOWNLOADING,
    UpdateState.DOWNLOADED,
    UpdateState.VERIFIED,
    UpdateState.INSTALLING,
    UpdateState.REBOOTING,
    UpdateState.SOAKING,
    UpdateState.ROLLING_BACK,
}


def execution_status(state: UpdateState, stopping: bool = False) -> JobStatus | None:
    """The status of the execution a device update is, or None when no execution is visible
    (not offered yet, or skipped at planning)."""
    if state == UpdateState.OFFERED:
        return JobStatus.CANCELED if stopping else JobStatus.QUEUED
    if state in _IN_PROGRESS:
        return JobStatus.IN_PROGRESS
    return {
        UpdateState.SUCCEEDED: JobStatus.SUCCEEDED,
        UpdateState.FAILED: JobStatus.FAILED,
        UpdateState.ROLLED_BACK: JobStatus.FAILED,
        UpdateState.RETRYING: JobStatus.FAILED,
        UpdateState.TIMED_OUT: JobStatus.TIMED_OUT,
        UpdateState.CANCELED: JobStatus.CANCELED,
    }.get(state)


# statusDetails.stage of an IN_PROGRESS update -> the report it stands for
STAGES = {
    "downloading": ReportState.DOWNLOADING,
    "downloaded": ReportState.DOWNLOADED,
    "verified": ReportState.VERIFIED,
    "installing": ReportState.INSTALLING,
    "rebooting": ReportState.REBOOTING,
}


def report_state_for(status: JobStatus, details: dict[str, str]) -> ReportState | None:
    """The fleet report a device-set status stands for; None for an IN_PROGRESS without a known
    stage (a heartbeat: it moves nothing)."""
    if status == JobStatus.IN_PROGRESS:
        return STAGES.get(details.get("stage", "").lower())
    if status == JobStatus.SUCCEEDED:
        return ReportState.SUCCEEDED
    return ReportState.FAILED  # FAILED and REJECTED


def error_for(status: JobStatus, details: dict[str, str]) -> ErrorCode | None:
    """statusDetails.reason when it is one of fleet's codes, else device_error."""
    if status not in (JobStatus.FAILED, JobStatus.REJECTED):
        return None
    try:
        return ErrorCode(details.get("reason", ""))
    except ValueError:
        return ErrorCode.INCOMPATIBLE if status == JobStatus.REJECTED else ErrorCode.DEVICE_ERROR


_PERCENT = re.compile(r"^[0-9]{1,3}$")


def progress_of(details: dict[str, str]) -> int:
    value = details.get("progress", "0").strip().rstrip("%")
    return min(100, int(value)) if _PERCENT.match(value) else 0
