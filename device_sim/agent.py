"""One device's update agent: reconciles the device to its retained ``desired`` document.

An asyncio state machine over an A/B slot pair. For each update it downloads the image (resuming
with ``Range``), checks the manifest signature and the sha256, waits for the install stage,
installs into the inactive slot, reboots and confirms the boot, or falls back to the old slot.
Its state lives in a small JSON file so that a restarted agent resumes where it stopped and never
installs an update_id twice. The protocol it implements is described in docs/protocol.md.

Run on a real device: ``python -m device_sim.agent --device-id X --model M --broker mqtt://...
--state-dir /var/lib/fleet-agent --public-key key.pub.pem --install-cmd "/usr/bin/flash-slot"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

from pydantic import ValidationError

from device_sim.context import AGENT_VERSION, AgentContext, AgentStats, load_public_key
from device_sim.mqtt_link import MqttLink
from device_sim.profiles import JobPlan, is_silent
from device_sim.soak import SoakSteps
from device_sim.state_store import AgentState, Job, MemoryStateStore, Phase, StateStore
from orchestrator.protocol import DEVICE_ID_PATTERN, Desired, ErrorCode, ReportState, Stage, report_topic

__all__ = ["AGENT_VERSION", "AgentContext", "AgentStats", "DeviceAgent", "load_public_key"]
log = logging.getLogger(__name__)
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_BUSY = (Phase.INSTALLING, Phase.REBOOTING)


class DeviceAgent(SoakSteps):
    """The update agent of one device. ``await agent.run()`` until ``stop()`` or ``kill()``."""

    __slots__ = (
        "_booted_at",
        "_deferred",
        "_heartbeat",
        "_held",
        "_job",
        "_last_report",
        "_plan",
        "_task",
        "ctx",
        "device_id",
        "labels",
        "link",
        "model",
        "silent",
        "state",
        "store",
    )

    def __init__(
        self,
        device_id: str,
        model: str,
        version: str,
        ctx: AgentContext,
        *,
        labels: dict[str, str] | None = None,
        store: StateStore | None = None,
    ) -> None:
        if not _DEVICE_ID.match(device_id):
            raise ValueError(f"invalid device id {device_id!r}")
        self.device_id = device_id
        self.model = model
        self.ctx = ctx
        self.labels = labels or {}
        self.store: StateStore = store or MemoryStateStore()
        state = self.store.load()
        if state is None:
            # First start: the given version is what the factory flashed into slot a.
            state = AgentState(slot="a", running_version=version)
        state.boot_count += 1  # an agent start is a boot as far as the soak's health goes
        self.store.save(state)
        self.state = state
        self._booted_at = time.monotonic()
        self._heartbeat: asyncio.Task[None] | None = None
        self.silent = is_silent(ctx.profile, ctx.seed, device_id)
        self.link = MqttLink(
            device_id,
            ctx.broker,
            on_message=self._on_desired,
            info=self._info_payload,
            gate=ctx.connect_gate,
            on_connect=self._on_connect,
            keepalive=ctx.keepalive,
        )
        self._last_report: bytes | None = None  # the latest report sent, for a reconnect
        self._job: Job | None = None
        self._task: asyncio.Task[None] | None = None
        self._deferred: bytes | None = None  # desired payload received during install/reboot
        self._plan: JobPlan | None = None
        self._held: bytes | None = None  # a report held back to be sent out of order

    # ------------------------------------------------------------ lifecycle
    @property
    def running_version(self) -> str:
        return self.state.running_version

    @property
    def slot(self) -> str:
        return self.state.slot

    @property
    def busy(self) -> bool:
        """True while an update is being downloaded, installed or rebooted."""
        return self._task is not None

    async def run(self) -> None:
        """Resume any interrupted work, then stay connected until stop() or kill()."""
        self._resume_after_restart()
        try:
            await self.link.run()
        finally:
            self._cancel_task()
            self._stop_heartbeats(force=True)

    async def stop(self, grace: float = 0.0) -> None:
        """Graceful shutdown: let an install/reboot in progress end (up to ``grace`` seconds),
        then publish "offline" and disconnect."""
        task = self._task
        if task is not None and grace > 0 and self._job is not None and self._job.phase in _BUSY:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), grace)
        rollback = self._rollback_in_progress()
        if rollback is not None and grace > 0:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(rollback), grace)
        self._cancel_task()
        self._stop_heartbeats(force=True)
        await self.link.close()

    def kill(self) -> None:
        """Stop abruptly, as if the process died: no "offline", the broker fires the last will.
        Persisted state is left exactly as it was."""
        self._cancel_task()
        self._stop_heartbeats(force=True)
        self.link.abort()

    def _on_connect(self, count: int) -> None:
        if self.ctx.on_connect is not None:
            self.ctx.on_connect(count)
        if count > 1 and self._last_report is not None:
            # A broker that crashed may have lost reports it had already acknowledged: say again
            # where the latest update stands. Same seq, so a receiver that has it ignores it.
            self.link.send(report_topic(self.device_id), self._last_report)

    # ------------------------------------------------------------ desired documents
    def _on_desired(self, payload: bytes) -> None:
        if self.silent:
            return
        job = self._job
        if job is not None and job.phase in _BUSY:
            # Never interrupt an install or reboot: look at the newest document once it ends.
            self._deferred = payload
            return
        if not payload.strip():
            self._clear()
            return
        try:
            desired = Desired.model_validate_json(payload)
        except ValidationError as exc:
            log.warning("%s: ignoring invalid desired document: %s", self.device_id, exc.errors()[:1])
            return
        self._handle(desired)

    def _handle(self, d: Desired) -> None:
        if d.stage in (Stage.SOAK, Stage.ROLLBACK):
            self._after_install(d)
            return
        if d.stage is Stage.CANCEL:
            self._stop_on_request(d)
            return
        self._stop_heartbeats()  # a new update: the previous one's soak is over
        done = self.state.find_finished(d.update_id)
        if done is not None and (done["installed"] or d.attempt <= done["attempt"]):
            self._republish(done, d.attempt)
            return
        job = self._job
        if job is not None and job.update_id == d.update_id and job.firmware.sha256 == d.firmware.sha256:
            self._same_update(job, d)
            return
        if job is not None:
            self._drop_job()
        if d.firmware.model != self.model:
            detail = f"firmware is for model {d.firmware.model!r}, device is {self.model!r}"
            self._finish(d.update_id, d.attempt, ReportState.FAILED, ErrorCode.INCOMPATIBLE, detail)
            return
        job = Job(update_id=d.update_id, attempt=d.attempt, firmware=d.firmware)
        job.install_requested = d.stage is Stage.INSTALL
        job.install_before = d.install_before
        self._job = job
        self.state.job = job
        self._start(job)

    def _same_update(self, job: Job, d: Desired) -> None:
        if d.attempt < job.attempt:
            return  # stale document from an earlier attempt
        wants_install = d.stage is Stage.INSTALL
        if d.attempt > job.attempt:
            job.attempt = d.attempt
            job.firmware = d.firmware  # the new attempt may carry a fresh download token
            job.install_requested = wants_install
            job.install_before = d.install_before
            if job.phase == Phase.VERIFIED:
                self._report(job.update_id, job.attempt, ReportState.VERIFIED, 100)
                if wants_install and self._task is None:
                    self._start(job)
            else:
                previous = self._cancel_task()
                self._discard_image(job)
                job.offset = 0
                self._start(job, previous)
            return
        # Same attempt: a duplicate delivery, a token refresh, or the install stage.
        job.firmware = d.firmware
        if wants_install:
            job.install_before = d.install_before
        if wants_install and not job.install_requested:
            job.install_requested = True
            self.store.save(self.state)
        if self._task is not None:
            return  # the running task picks up install_requested when the image is verified
        if job.phase == Phase.VERIFIED and not job.install_requested:
            # A late or restarted orchestrator catches up.
            self._report(job.update_id, job.attempt, ReportState.VERIFIED, 100)
        else:
            self._start(job)  # resume a download after a restart, or install the verified image

    def _stop_on_request(self, d: Desired) -> None:
        """An operator stopped this update. Never reached while installing (that document waits
        for the install to end): drop the download or verified image and report CANCELED."""
        done = self.state.find_finished(d.update_id)
        if done is not None:
            self._republish(done, done["attempt"])  # it ended before the request came
            return
        job = self._job
        if job is not None and job.update_id == d.update_id:
            self._drop_job()
        detail = "stopped on the operator's request before installing"
        self._finish(d.update_id, d.attempt, ReportState.CANCELED, ErrorCode.CANCELED, detail)

    def _clear(self) -> None:
        """Empty desired document: nothing to do. Abandon a download or a verified image."""
        self._stop_heartbeats()
        if self._job is not None:
            self._drop_job()

    def _drop_job(self) -> None:
        job = self._job
        self._cancel_task()
        if job is not None:
            self._discard_image(job)
        self._job = None
        self.state.job = None
        self._plan = None
        self.store.save(self.state)

    def _republish(self, done: dict[str, Any], attempt: int) -> None:
        """Re-send the final report of a finished update (idempotent; a later attempt of an update
        that reached the install step gets the same outcome under its own attempt number)."""
        detail = done.get("detail")
        if attempt > done["attempt"]:
            detail = f"update already finished at attempt {done['attempt']}; never installed twice"
        else:
            attempt = done["attempt"]
        error = ErrorCode(done["error"]) if done.get("error") else None
        state = ReportState(done["state"])
        self._report(done["update_id"], attempt, state, done.get("progress", 0), error, detail)

    # ------------------------------------------------------------ the job task
    def _start(self, job: Job, previous: asyncio.Task[None] | None = None) -> None:
        previous = self._cancel_task() or previous
        self._task = asyncio.get_running_loop().create_task(self._run_job(job, previous))

    def _cancel_task(self) -> asyncio.Task[None] | None:
        task = self._task
        if task is not None:
            task.cancel()
            self._task = None
        return task

    async def _run_job(self, job: Job, previous: asyncio.Task[None] | None) -> None:
        me = asyncio.current_task()
        try:
            if previous is not None:
                await asyncio.wait([previous])  # let a cancelled task close its files first
            self._plan = self._plan_for(job)
            if job.phase == Phase.DOWNLOAD and not await self._download_and_verify(job):
                return
            if job.phase == Phase.VERIFIED and job.install_requested and self._window_closed(job):
                # Too late to begin: say VERIFIED again and wait for the next install document.
                job.install_requested = False
                self._report(job.update_id, job.attempt, ReportState.VERIFIED, 100)
            elif job.phase == Phase.VERIFIED and job.install_requested:
                await self._install(job)
            elif job.phase == Phase.REBOOTING:
                await self._confirm_boot(job, self._install_request(job))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: update %s failed unexpectedly", self.device_id, job.update_id)
            if self._job is job:
                busy = job.phase in _BUSY
                self._end(job, ReportState.FAILED, ErrorCode.DEVICE_ERROR, repr(exc)[:300], installed=busy)
        finally:
            if self._task is me:
                self._task = None
                self._flush_held()
                deferred, self._deferred = self._deferred, None
                if deferred is not None:
                    self._on_desired(deferred)

    @staticmethod
    def _window_closed(job: Job) -> bool:
        return job.install_before is not None and time.time() > job.install_before

    def _resume_after_restart(self) -> None:
        job = self.state.job
        if job is None or self._job is not None:
            return
        self._job = job
        if job.phase == Phase.INSTALLING:
            detail = "install interrupted by an agent restart; old slot still active"
            self._end(job, ReportState.FAILED, ErrorCode.INSTALL_ERROR, detail, installed=True)
        elif job.phase == Phase.REBOOTING:
            self._start(job)  # boot confirmation
        elif job.phase == Phase.VERIFIED and self.ctx.store_images:
            path = self._image_path(job)
            if path is not None and not path.exists():
                job.phase = Phase.DOWNLOAD
                job.offset = 0
        # DOWNLOAD / VERIFIED: wait for the retained desired document to say what to do.


if __name__ == "__main__":
    from device_sim.cli import agent_main

    agent_main()
