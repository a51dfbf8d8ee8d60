"""A simulated device whose MQTT side is the unmodified AWS IoT Device SDK (``awsiotsdk``'s
``iotjobs`` client over an ``awscrt`` connection to fleet's broker), and whose update side is the
simulator's own: the same downloader, digest and signature checks, and installer.

It behaves like the SDK's jobs sample: on connecting and on every ``notify-next`` it asks for the
next job with ``start-next``; it runs the job, reporting ``IN_PROGRESS`` with
``statusDetails {"stage": ..., "progress": ...}``, and ends it ``SUCCEEDED`` (with
``running_version``) or ``FAILED`` (with ``reason`` and ``message``); then it asks again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from awscrt import io, mqtt
from awsiot import iotjobs

from device_sim.context import AgentContext
from device_sim.downloader import DownloadFailed, HashSink, download
from device_sim.installer import InstallError, InstallRequest
from device_sim.profiles import plan_job
from orchestrator.protocol import ErrorCode, FirmwareRef, verify_manifest_signature

log = logging.getLogger(__name__)
QOS = mqtt.QoS.AT_LEAST_ONCE
AWS_JOBS = "aws-jobs"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class AwsDeviceStats:
    succeeded: int = 0
    failed: int = 0
    rejected_replies: list[str] = field(default_factory=list)


class AwsJobsDevice:
    """One thing. Precondition: registered in fleet with protocol ``aws-jobs`` and the same id."""

    def __init__(self, thing: str, model: str, version: str, ctx: AgentContext) -> None:
        self.thing = thing
        self.model = model
        self.running_version = version
        self.ctx = ctx
        self.stats = AwsDeviceStats()
        self.installs = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False
        self._asked: str | None = None
        self._jobs: iotjobs.IotJobsClient | None = None
        self._connection: mqtt.Connection | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ connection
    def _connect(self) -> mqtt.Connection:
        broker = self.ctx.broker
        tls = None
        if broker.tls:
            options = io.TlsContextOptions()
            if broker.tls_cert_dir is not None:
                options = io.TlsContextOptions.create_client_with_mtls_from_path(
                    str(broker.tls_cert_dir / f"{self.thing}.crt"),
                    str(broker.tls_cert_dir / f"{self.thing}.key"),
                )
            if broker.tls_ca is not None:
                options.override_default_trust_store_from_path(None, str(broker.tls_ca))
            tls = io.ClientTlsContext(options)
        client = mqtt.Client(io.ClientBootstrap.get_or_create_static_default(), tls)
        password = broker.password_for(self.thing)
        return mqtt.Connection(
            client=client,
            host_name=broker.host,
            port=broker.port,
            client_id=self.thing,
            clean_session=True,
            keep_alive_secs=self.ctx.keepalive,
            reconnect_min_timeout_secs=1,
            reconnect_max_timeout_secs=10,
            username=self.thing if password is not None else None,
            password=password,
            disable_metrics=True,  # the SDK would append them to the username and fail the login
            on_connection_resumed=lambda **_: self._poke(),
        )

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._connection = self._connect()
        await asyncio.wrap_future(self._connection.connect())
        jobs = iotjobs.IotJobsClient(self._connection)
        self._jobs = jobs
        thing = self.thing
        subscriptions = [
            jobs.subscribe_to_next_job_execution_changed_events(
                iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing), QOS, self._on_next
            ),
            jobs.subscribe_to_start_next_pending_job_execution_accepted(
                iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing),
                QOS,
                self._on_started,
            ),
            jobs.subscribe_to_start_next_pending_job_execution_rejected(
                iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing),
                QOS,
                self._on_rejected,
            ),
            jobs.subscribe_to_update_job_execution_rejected(
                iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"),
                QOS,
                self._on_rejected,
            ),
        ]
        for future, _topic in subscriptions:
            await asyncio.wrap_future(future)
        self._poke()

    async def stop(self) -> None:
        if self._connection is not None:
            await asyncio.wrap_future(self._connection.disconnect())

    # ------------------------------------------------------------------ SDK callbacks (CRT thread)
    def _poke(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._ask_next)

    def _on_next(self, event: iotjobs.NextJobExecutionChangedEvent | None) -> None:
        if event is not None and event.execution is not None:
            self._poke()

    def _on_started(self, response: iotjobs.StartNextJobExecutionResponse | None) -> None:
        # Only the answer to the latest request: an older one may name a job already done.
        if response is None or response.client_token != self._asked or self._loop is None:
            return
        if response.execution is None:
            return
        execution = response.execution
        self._loop.call_soon_threadsafe(self._begin, execution.job_id, execution.job_document or {})

    def _on_rejected(self, error: iotjobs.RejectedError | None) -> None:
        if error is not None:
            self.stats.rejected_replies.append(str(error.code))
            log.warning("%s: request rejected: %s %s", self.thing, error.code, error.message)

    # ------------------------------------------------------------------ jobs (event loop)
    def _ask_next(self) -> None:
        if self._busy or self._jobs is None:
            return
        self._asked = uuid.uuid4().hex
        request = iotjobs.StartNextPendingJobExecutionRequest(thing_name=self.thing, client_token=self._asked)
        self._jobs.publish_start_next_pending_job_execution(request, QOS)

    def _keep(self, task: asyncio.Future[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _begin(self, job_id: str, document: dict[str, Any]) -> None:
        if self._busy:
            return
        self._busy = True
        self._keep(asyncio.ensure_future(self._run(job_id, document)))

    async def _update(self, job_id: str, status: str, **details: str) -> None:
        assert self._jobs is not None
        # statusDetails values are 1-1024 characters without control characters (AWS rule)
        details = {k: (_CONTROL.sub(" ", v)[:1024] or "-") for k, v in details.items()}
        request = iotjobs.UpdateJobExecutionRequest(
            thing_name=self.thing, job_id=job_id, status=status, status_details=details or None
        )
        future: concurrent.futures.Future[None] = self._jobs.publish_update_job_execution(request, QOS)
        await asyncio.wrap_future(future)

    async def _run(self, job_id: str, document: dict[str, Any]) -> None:
        try:
            await self._run_job(job_id, document)
        except Exception as exc:  # a job that cannot run ends FAILED, and the device goes on
            log.exception("%s: job %s failed", self.thing, job_id)
            await self._update(job_id, "FAILED", reason=str(ErrorCode.DEVICE_ERROR), message=str(exc)[:300])
            self.stats.failed += 1
        finally:
            self._busy = False
            self._ask_next()

    async def _run_job(self, job_id: str, document: dict[str, Any]) -> None:
        firmware = FirmwareRef.model_validate(document.get("firmware", {}))
        update_id, attempt = int(document.get("update_id", 0)), int(document.get("attempt", 1))
        plan = plan_job(self.ctx.profile, self.ctx.seed, self.thing, update_id, attempt)

        async def fail(code: ErrorCode, message: str) -> None:
            await self._update(job_id, "FAILED", reason=str(code), message=message[:300])
            self.stats.failed += 1

        if firmware.model != self.model:
            await fail(ErrorCode.INCOMPATIBLE, f"image for {firmware.model}, device is {self.model}")
            return
        if not verify_manifest_signature(self.ctx.public_key, firmware):
            await fail(ErrorCode.SIGNATURE, "manifest signature does not verify")
            return
        await self._update(job_id, "IN_PROGRESS", stage="downloading", progress="0")
        sink = HashSink()
        reported = [0]

        def on_progress(offset: int) -> None:
            pct = offset * 100 // max(1, firmware.size)
            if pct >= reported[0] + 25 and pct < 100:
                reported[0] = pct - pct % 25
                self._keep(
                    asyncio.ensure_future(
                        self._update(job_id, "IN_PROGRESS", stage="downloading", progress=str(reported[0]))
                    )
                )

        try:
            await download(
                self.ctx.http_client(),
                firmware,
                sink,
                plan,
                on_progress=on_progress,
                network_loss=asyncio.sleep,
                retries=5,
            )
        except DownloadFailed as exc:
            await fail(exc.code, exc.detail)
            return
        if sink.hexdigest() != firmware.sha256:
            await fail(ErrorCode.CHECKSUM, "sha256 of the image does not match the manifest")
            return
        await self._update(job_id, "IN_PROGRESS", stage="verified", progress="100")
        request = InstallRequest(
            device_id=self.thing,
            update_id=update_id,
            attempt=attempt,
            model=firmware.model,
            version=firmware.version,
            sha256=firmware.sha256,
            image=None,
            target_slot="b",
            plan=plan,
        )
        await self._update(job_id, "IN_PROGRESS", stage="installing", progress="100")
        try:
            self.installs += 1
            await self.ctx.installer.install(request)
        except InstallError as exc:
            await fail(ErrorCode.INSTALL_ERROR, str(exc))
            return
        await self._update(job_id, "IN_PROGRESS", stage="rebooting", progress="100")
        await self.ctx.installer.reboot(request)
        if not await self.ctx.installer.confirm_boot(request):
            await fail(ErrorCode.BOOT_FAILURE, "the new slot did not boot; back on the old one")
            return
        self.running_version = firmware.version
        await self._update(job_id, "SUCCEEDED", running_version=firmware.version)
        self.stats.succeeded += 1
