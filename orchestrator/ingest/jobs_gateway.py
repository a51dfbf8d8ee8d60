"""Answers AWS IoT Jobs requests from SQL and turns the device's status updates into fleet reports.

It runs inside the ingest's batch transaction: a request that moves an execution forward yields a
:class:`~orchestrator.protocol.Report` that the batch applies through the same
:class:`~orchestrator.ingest.report_applier.ReportApplier` as a fleet device's report, so there is
one state machine. The replies go out after the commit. The gateway checks the AWS rules first
(device-settable statuses, terminal executions, ``expectedVersion``, ``executionNumber``) so a
refused request is answered ``rejected`` and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.aws_jobs import (
    DEVICE_SETTABLE,
    PROTOCOL,
    REQUEST_MODELS,
    TERMINAL,
    DescribeRequest,
    JobStatus,
    Operation,
    RejectCode,
    RequestTopic,
    StartNextRequest,
    UpdateRequest,
    client_token_of,
    error_for,
    execution,
    execution_status,
    job_document,
    notices,
    progress_of,
    rejection,
    reply,
    report_state_for,
    summary,
    update_id_of,
)
from orchestrator.config import Settings
from orchestrator.engine.desired import firmware_ref
from orchestrator.models import Device, DeviceUpdate, Firmware, JobExecution, Rollout
from orchestrator.protocol import Report, ReportState
from orchestrator.state_machines import UPDATE_IN_FLIGHT, UpdateState

_VISIBLE = (*UPDATE_IN_FLIGHT, UpdateState.SOAKING, UpdateState.ROLLING_BACK)


@dataclass
class GatewayOutcome:
    replies: list[tuple[str, bytes]] = field(default_factory=list)
    reports: list[tuple[str, Report]] = field(default_factory=list)
    changed_things: set[str] = field(default_factory=set)
    # Replies that depend on whether the reports were applied: called after they were committed.
    after: list[Callable[[Session], list[tuple[str, bytes]]]] = field(default_factory=list)

    def finish(self, session: Session) -> list[tuple[str, bytes]]:
        """Every reply, once ``reports`` are applied and committed."""
        return self.replies + [r for build in self.after for r in build(session)]


@dataclass
class _Execution:
    update: DeviceUpdate
    record: JobExecution
    firmware: Firmware

    @property
    def status(self) -> JobStatus | None:
        status = execution_status(UpdateState(self.update.state), self.update.stop_requested_at is not None)
        said = self.record.device_status
        if status == JobStatus.FAILED and said == JobStatus.REJECTED:
            return JobStatus.REJECTED
        if status == JobStatus.IN_PROGRESS and said in TERMINAL:
            # The device ended it (fleet may still wait, e.g. for a report it refused): never hand
            # a finished job out again.
            return JobStatus(said)
        return status


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None or moment.tzinfo else moment.replace(tzinfo=UTC)


class JobsGateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # ------------------------------------------------------------------ reading executions
    def _execution(self, session: Session, du: DeviceUpdate) -> _Execution:
        record = session.get(JobExecution, (du.id, du.attempt))
        if record is None:
            record = JobExecution(
                device_update_id=du.id, execution_number=du.attempt, version_number=1, status_details={}
            )
            session.add(record)
        rollout = session.get_one(Rollout, du.rollout_id)
        return _Execution(du, record, session.get_one(Firmware, rollout.firmware_id))

    def pending(self, session: Session, thing: str) -> list[_Execution]:
        """Open executions of ``thing``: in progress first, then queued, oldest offer first."""
        rows = session.scalars(
            select(DeviceUpdate)
            .join(Rollout, Rollout.id == DeviceUpdate.rollout_id)
            .where(DeviceUpdate.device_id == thing, DeviceUpdate.state.in_(_VISIBLE))
            .order_by(DeviceUpdate.offered_at, DeviceUpdate.id)
        ).all()
        executions = [self._execution(session, du) for du in rows]
        executions = [e for e in executions if e.status in (JobStatus.IN_PROGRESS, JobStatus.QUEUED)]
        return sorted(executions, key=lambda e: e.status != JobStatus.IN_PROGRESS)

    def _summary(self, e: _Execution) -> dict[str, Any]:
        updated = max(e.update.updated_at, e.record.updated_at or e.update.updated_at)
        return summary(
            e.update.id,
            e.update.attempt,
            e.record.version_number,
            _aware(e.update.offered_at),
            _aware(e.record.started_at),
            _aware(updated),
        )

    def document(self, e: _Execution, thing: str) -> dict[str, Any]:
        """The job document: what to install, where to fetch it, and how to check it."""
        ref = firmware_ref(self.settings, e.firmware, thing)
        return job_document(ref.model_dump(), e.update.id, e.update.attempt)

    def execution_body(self, e: _Execution, thing: str, *, with_document: bool = True) -> dict[str, Any]:
        document = self.document(e, thing) if with_document else None
        return execution(self._summary(e), thing, e.status, e.record.status_details or {}, document)

    def notifications(self, session: Session, thing: str, now: float) -> list[tuple[str, bytes]]:
        """notify and notify-next for ``thing`` as its executions stand now."""
        pending = self.pending(session, thing)
        return notices(
            thing,
            now,
            [self._summary(e) for e in pending if e.status == JobStatus.QUEUED],
            [self._summary(e) for e in pending if e.status == JobStatus.IN_PROGRESS],
            self.execution_body(pending[0], thing) if pending else None,
        )

    # ------------------------------------------------------------------ requests
    def handle(
        self, session: Session, requests: list[tuple[RequestTopic, bytes]], now: float | None = None
    ) -> GatewayOutcome:
        """Answer each request in order. Precondition: every topic names a registered device; the
        caller has checked the thing name against the sender."""
        out = GatewayOutcome()
        moment = time.time() if now is None else now
        for topic, payload in requests:
            self._one(session, topic, payload, moment, out)
        return out

    def _one(
        self, session: Session, topic: RequestTopic, payload: bytes, now: float, out: GatewayOutcome
    ) -> None:
        base = topic.reply_base

        def reject(
            code: RejectCode, message: str, token: str | None, state: dict[str, Any] | None = None
        ) -> None:
            out.replies.append((f"{base}/rejected", rejection(code, message, token, now, state)))

        model = REQUEST_MODELS[topic.operation]
        try:
            request = model.model_validate_json(payload or b"{}")
        except ValidationError as exc:
            token = client_token_of(payload)
            first = exc.errors(include_url=False, include_input=False)[0]
            if first.get("type") == "json_invalid":
                reject(RejectCode.INVALID_JSON, "the request is not valid JSON", token)
            else:
                where = ".".join(str(p) for p in first.get("loc", ())) or "request"
                reject(RejectCode.INVALID_REQUEST, f"{where}: {first.get('msg', 'invalid')}", token)
            return
        token = request.clientToken
        device = session.get(Device, topic.thing)
        if device is None or device.protocol != PROTOCOL:
            reject(RejectCode.RESOURCE_NOT_FOUND, f"thing {topic.thing} is not an aws-jobs device", token)
            return
        if topic.operation == Operation.GET_PENDING:
            pending = self.pending(session, topic.thing)
            body: dict[str, Any] = {
                "inProgressJobs": [self._summary(e) for e in pending if e.status == JobStatus.IN_PROGRESS],
                "queuedJobs": [self._summary(e) for e in pending if e.status == JobStatus.QUEUED],
            }
            out.replies.append((f"{base}/accepted", reply(body, token, now)))
            return
        if topic.operation == Operation.START_NEXT:
            assert isinstance(request, StartNextRequest)
            try:
                self._start_next(session, topic, request, device, now, out)
            except ValidationError:
                reject(RejectCode.INVALID_REQUEST, "statusDetails give no valid report", token)
            return
        execution = self._find(session, topic)
        if execution is None:
            reject(RejectCode.RESOURCE_NOT_FOUND, f"no execution {topic.job_id} for {topic.thing}", token)
            return
        if topic.operation == Operation.DESCRIBE:
            assert isinstance(request, DescribeRequest)
            if request.executionNumber is not None and request.executionNumber != execution.update.attempt:
                reject(RejectCode.RESOURCE_NOT_FOUND, f"no execution number {request.executionNumber}", token)
                return
            body = {
                "execution": self.execution_body(
                    execution, topic.thing, with_document=request.includeJobDocument
                )
            }
            out.replies.append((f"{base}/accepted", reply(body, token, now)))
            return
        assert isinstance(request, UpdateRequest)
        try:
            self._update(topic, request, execution, device, now, out)
        except ValidationError as exc:
            where = (
                ".".join(str(p) for p in exc.errors(include_url=False)[0].get("loc", ())) or "statusDetails"
            )
            reject(RejectCode.INVALID_REQUEST, f"statusDetails give no valid report ({where})", token)

    def _find(self, session: Session, topic: RequestTopic) -> _Execution | None:
        if topic.job_id == "$next":
            pending = self.pending(session, topic.thing)
            return pending[0] if pending else None
        update_id = update_id_of(topic.job_id or "")
        du = session.get(DeviceUpdate, update_id) if update_id is not None else None
        if du is None or du.device_id != topic.thing:
            return None
        execution = self._execution(session, du)
        return execution if execution.status is not None else None

    def _start_next(
        self,
        session: Session,
        topic: RequestTopic,
        request: StartNextRequest,
        device: Device,
        now: float,
        out: GatewayOutcome,
    ) -> None:
        pending = self.pending(session, topic.thing)
        if not pending:
            out.replies.append((f"{topic.reply_base}/accepted", reply({}, request.clientToken, now)))
            return
        e = pending[0]
        accepted = f"{topic.reply_base}/accepted"
        if e.status != JobStatus.QUEUED:
            body = {"execution": self.execution_body(e, topic.thing)}
            out.replies.append((accepted, reply(body, request.clientToken, now)))
            return
        self._move(e, JobStatus.IN_PROGRESS, request.statusDetails, device, now, out)

        def started(session: Session) -> list[tuple[str, bytes]]:
            # An abort may have canceled the execution first: then there is nothing to start.
            session.refresh(e.update)
            if e.status != JobStatus.IN_PROGRESS:
                return [(accepted, reply({}, request.clientToken, now))]
            return [
                (
                    accepted,
                    reply({"execution": self.execution_body(e, topic.thing)}, request.clientToken, now),
                )
            ]

        out.after.append(started)

    def _update(
        self,
        topic: RequestTopic,
        request: UpdateRequest,
        e: _Execution,
        device: Device,
        now: float,
        out: GatewayOutcome,
    ) -> None:
        token = request.clientToken

        def state() -> dict[str, Any]:
            return {
                "status": str(e.status),
                "statusDetails": dict(e.record.status_details or {}),
                "versionNumber": e.record.version_number,
            }

        base = topic.reply_base
        if request.executionNumber is not None and request.executionNumber != e.update.attempt:
            message = f"no execution number {request.executionNumber} (current: {e.update.attempt})"
            out.replies.append(
                (f"{base}/rejected", rejection(RejectCode.RESOURCE_NOT_FOUND, message, token, now))
            )
            return
        if request.status not in DEVICE_SETTABLE:
            message = f"a device may set {', '.join(sorted(DEVICE_SETTABLE))}, not {request.status}"
            out.replies.append(
                (f"{base}/rejected", rejection(RejectCode.INVALID_REQUEST, message, token, now))
            )
            return
        if e.status in TERMINAL:
            message = f"the execution is {e.status}: it cannot become {request.status}"
            out.replies.append(
                (
                    f"{base}/rejected",
                    rejection(RejectCode.INVALID_STATE_TRANSITION, message, token, now, state()),
                )
            )
            return
        if request.expectedVersion is not None and request.expectedVersion != e.record.version_number:
            message = (
                f"expectedVersion {request.expectedVersion} is not the current {e.record.version_number}"
            )
            out.replies.append(
                (f"{base}/rejected", rejection(RejectCode.VERSION_MISMATCH, message, token, now, state()))
            )
            return
        was_queued = e.status == JobStatus.QUEUED
        self._move(e, request.status, request.statusDetails, device, now, out)
        body: dict[str, Any] = {}
        if request.includeJobExecutionState:
            body["executionState"] = {**state(), "status": str(request.status)}
        if request.includeJobDocument:
            body["jobDocument"] = self.document(e, topic.thing)
        if not was_queued:
            out.replies.append((f"{base}/accepted", reply(body, token, now)))
            return

        def decided(session: Session) -> list[tuple[str, bytes]]:
            session.refresh(e.update)
            if e.status == JobStatus.CANCELED:  # canceled before this request took it
                message = "the execution was canceled before it started"
                return [
                    (
                        f"{base}/rejected",
                        rejection(RejectCode.INVALID_STATE_TRANSITION, message, token, now, state()),
                    )
                ]
            return [(f"{base}/accepted", reply(body, token, now))]

        out.after.append(decided)

    def _move(
        self,
        e: _Execution,
        status: JobStatus,
        details: dict[str, str] | None,
        device: Device,
        now: float,
        out: GatewayOutcome,
    ) -> None:
        """Record the device's update on the execution and queue the report it stands for.
        Raises ValidationError, before changing anything, when the details make no valid report."""
        record = e.record
        current = dict(details) if details is not None else dict(record.status_details or {})
        report = self._report_for(e, status, current, device, now)
        moment = datetime.fromtimestamp(now, UTC)
        record.version_number += 1
        record.updated_at = moment
        record.status_details = current
        if record.started_at is None:
            record.started_at = moment
        if status in TERMINAL:
            record.device_status = str(status)
            out.changed_things.add(device.id)  # it leaves the pending list: notify
        if report is not None:
            out.reports.append((device.id, report))

    def _report_for(
        self, e: _Execution, status: JobStatus, details: dict[str, str], device: Device, now: float
    ) -> Report | None:
        state = report_state_for(status, details)
        if state is None and e.status == JobStatus.QUEUED:
            state = ReportState.DOWNLOADING  # started: the device owns it from now on
        if state is None:
            return None  # IN_PROGRESS again with no new stage: details and version only
        running = device.firmware_version
        if state == ReportState.SUCCEEDED:
            running = details.get("running_version", e.firmware.version)
        error = error_for(status, details)
        return Report(
            update_id=e.update.id,
            attempt=e.update.attempt,
            state=state,
            seq=e.update.attempt * 1_000_000 + min(e.record.version_number + 1, 999_999),
            progress=100 if state == ReportState.SUCCEEDED else progress_of(details),
            running_version=running[:64],
            error=error,
            detail=(details.get("message") or (f"job status {status}" if error else ""))[:500] or None,
            ts=now,
        )
