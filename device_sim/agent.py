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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import ValidationError

from device_sim.downloader import DownloadFailed, FileSink, HashSink, ImageSink, download, image_name
from device_sim.installer import Installer, InstallError, InstallRequest, SimulatedInstaller
from device_sim.mqtt_link import BrokerAddress, MqttLink
from device_sim.profiles import INSTANT, JobPlan, Profile, is_silent, plan_job
from device_sim.state_store import AgentState, Job, MemoryStateStore, Phase, StateStore
from orchestrator.protocol import (
    DEVICE_ID_PATTERN,
    Desired,
    DeviceInfo,
    ErrorCode,
    FirmwareRef,
    Report,
    ReportState,
    Stage,
    info_topic,
    report_topic,
    verify_manifest_signature,
)

log = logging.getLogger(__name__)
AGENT_VERSION = "0.1.0"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
# Reports a flaky device may hold back and send after the next one: only those that another
# report follows without any action of the orchestrator (VERIFIED waits for the install stage).
_HOLDABLE = frozenset(
    {ReportState.DOWNLOADING, ReportState.DOWNLOADED, ReportState.INSTALLING, ReportState.REBOOTING}
)
_BUSY = (Phase.INSTALLING, Phase.REBOOTING)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load the provisioned firmware-signing public key (PEM)."""
    key = load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an ed25519 public key")
    return key


@dataclass(slots=True)
class AgentStats:
    """Counters shared by the agents of a fleet (cheap: a few integers per state)."""

    reports: Counter[str] = field(default_factory=Counter)
    finished: Counter[str] = field(default_factory=Counter)
    connected: int = 0
    reconnects: int = 0

    def on_connect(self, count: int) -> None:
        if count == 1:
            self.connected += 1
        else:
            self.reconnects += 1


@dataclass(slots=True)
class AgentContext:
    """Everything agents can share: one per fleet, so each agent stays small."""

    broker: BrokerAddress
    public_key: Ed25519PublicKey
    profile: Profile = INSTANT
    installer: Installer = field(default_factory=SimulatedInstaller)
    seed: int = 0
    keepalive: int = 60
    store_images: bool = True  # keep image bytes under the state dir (needed by a command installer)
    connect_gate: asyncio.Semaphore | None = None
    on_connect: Callable[[int], None] | None = None
    stats: AgentStats = field(default_factory=AgentStats)
    http_connections: int = 256
    http_verify: bool | str = True
    _http: httpx.AsyncClient | None = None

    def http_client(self) -> httpx.AsyncClient:
        """The shared HTTP client, created on first use."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                # No pool timeout: with thousands of devices some wait for a free connection.
                timeout=httpx.Timeout(30.0, pool=None),
                limits=httpx.Limits(
                    max_connections=self.http_connections,
                    max_keepalive_connections=min(64, self.http_connections),
                ),
                follow_redirects=True,
                verify=self.http_verify,
            )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


class DeviceAgent:
    """The update agent of one device. ``await agent.run()`` until ``stop()`` or ``kill()``."""

    __slots__ = (
        "_deferred",
        "_held",
        "_job",
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
            self.store.save(state)
        self.state = state
        self.silent = is_silent(ctx.profile, ctx.seed, device_id)
        self.link = MqttLink(
            device_id,
            ctx.broker,
            on_message=self._on_desired,
            info=self._info_payload,
            gate=ctx.connect_gate,
            on_connect=ctx.on_connect,
            keepalive=ctx.keepalive,
        )
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

    async def stop(self, grace: float = 0.0) -> None:
        """Graceful shutdown: let an install/reboot in progress end (up to ``grace`` seconds),
        then publish "offline" and disconnect."""
        task = self._task
        if task is not None and grace > 0 and self._job is not None and self._job.phase in _BUSY:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), grace)
        self._cancel_task()
        await self.link.close()

    def kill(self) -> None:
        """Stop abruptly, as if the process died: no "offline", the broker fires the last will.
        Persisted state is left exactly as it was."""
        self._cancel_task()
        self.link.abort()

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

    def _clear(self) -> None:
        """Empty desired document: nothing to do. Abandon a download or a verified image."""
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
            if job.phase == Phase.VERIFIED and job.install_requested:
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

    async def _download_and_verify(self, job: Job) -> bool:
        fw = job.firmware
        plan = self._plan or JobPlan()
        if not verify_manifest_signature(self.ctx.public_key, fw):
            # Checked before any byte is fetched: an unsigned image is never downloaded.
            self._end(job, ReportState.FAILED, ErrorCode.SIGNATURE, "manifest signature does not verify")
            return False
        if self.ctx.profile.fetch == "skip":
            self._report(job.update_id, job.attempt, ReportState.DOWNLOADING, 0)
            size, digest = fw.size, ("0" * 64 if plan.corrupt else fw.sha256)
            sink: ImageSink | None = None
        else:
            sink = self._open_sink(job)
            size, digest = await self._fetch(job, sink, plan)
            if size < 0:
                return False
        self._report(job.update_id, job.attempt, ReportState.DOWNLOADED, 100)
        if size != fw.size or digest != fw.sha256:
            if sink is not None:
                sink.discard()
            why = f"size {size} != {fw.size}" if size != fw.size else f"sha256 {digest} != {fw.sha256}"
            self._end(job, ReportState.FAILED, ErrorCode.CHECKSUM, why, progress=100)
            return False
        if sink is not None:
            sink.finish()
        job.phase = Phase.VERIFIED
        job.offset = fw.size
        self._report(job.update_id, job.attempt, ReportState.VERIFIED, 100)
        return True

    async def _fetch(self, job: Job, sink: ImageSink, plan: JobPlan) -> tuple[int, str]:
        """Download into ``sink``; returns (size, sha256), or (-1, "") after reporting FAILED."""
        fw = job.firmware
        step = self.ctx.profile.progress_step
        pct = sink.offset * 100 // fw.size if fw.size else 0
        self._report(job.update_id, job.attempt, ReportState.DOWNLOADING, min(pct, 99))
        last = pct // step

        def on_progress(offset: int) -> None:
            nonlocal last
            now = offset * 100 // fw.size if fw.size else 100
            if now // step > last and now < 100:
                last = now // step
                job.offset = offset  # checkpointed by the report's state save
                self._report(job.update_id, job.attempt, ReportState.DOWNLOADING, now)

        try:
            await download(
                self.ctx.http_client(),
                fw,
                sink,
                plan,
                on_progress=on_progress,
                network_loss=self.link.drop,
                retries=self.ctx.profile.download_retries,
            )
        except DownloadFailed as exc:
            sink.discard()
            self._end(job, ReportState.FAILED, exc.code, exc.detail)
            return -1, ""
        except BaseException:
            if isinstance(sink, FileSink):
                sink.close()  # keep the part file: the next start resumes from it
            raise
        return sink.offset, sink.hexdigest()

    def _open_sink(self, job: Job) -> ImageSink:
        directory = self.store.image_dir if self.ctx.store_images else None
        if directory is None:
            return HashSink()
        name = image_name(job.update_id, job.firmware.sha256)
        if directory.exists():
            for stale in directory.iterdir():
                if not stale.name.startswith(name + "."):
                    stale.unlink(missing_ok=True)
        return FileSink(directory, name)

    def _image_path(self, job: Job) -> Path | None:
        directory = self.store.image_dir if self.ctx.store_images else None
        if directory is None:
            return None
        return directory / f"{image_name(job.update_id, job.firmware.sha256)}.img"

    def _discard_image(self, job: Job) -> None:
        directory = self.store.image_dir if self.ctx.store_images else None
        if directory is None or not directory.exists():
            return
        name = image_name(job.update_id, job.firmware.sha256)
        for path in (directory / f"{name}.part", directory / f"{name}.img"):
            path.unlink(missing_ok=True)

    def _plan_for(self, job: Job) -> JobPlan:
        return plan_job(self.ctx.profile, self.ctx.seed, self.device_id, job.update_id, job.attempt)

    def _install_request(self, job: Job) -> InstallRequest:
        fw = job.firmware
        return InstallRequest(
            device_id=self.device_id,
            update_id=job.update_id,
            attempt=job.attempt,
            model=fw.model,
            version=fw.version,
            sha256=fw.sha256,
            image=self._image_path(job),
            target_slot="b" if self.state.slot == "a" else "a",
            plan=self._plan or self._plan_for(job),
        )

    async def _install(self, job: Job) -> None:
        req = self._install_request(job)
        job.phase = Phase.INSTALLING  # saved with the report: a restart from here = interrupted install
        self._report(job.update_id, job.attempt, ReportState.INSTALLING, 100)
        installer = self.ctx.installer
        try:
            await installer.install(req)
        except InstallError as exc:
            self._end(job, ReportState.FAILED, ErrorCode.INSTALL_ERROR, str(exc), installed=True)
            return
        job.phase = Phase.REBOOTING  # saved with the report: a restart from here = boot confirmation
        self._report(job.update_id, job.attempt, ReportState.REBOOTING, 100)
        if req.plan.reboot_offline:
            await self.link.drain(2.0)  # let REBOOTING out before the connection goes down
            self.link.go_offline(req.plan.boot_time)
        try:
            await installer.reboot(req)
        except InstallError as exc:
            self._end(job, ReportState.FAILED, ErrorCode.INSTALL_ERROR, str(exc), installed=True)
            return
        await self._confirm_boot(job, req)

    async def _confirm_boot(self, job: Job, req: InstallRequest) -> None:
        ok = await self.ctx.installer.confirm_boot(req)
        st = self.state
        if ok:
            st.previous_version, st.running_version = st.running_version, req.version
            st.slot = "b" if req.target_slot == "b" else "a"
            self._discard_image(job)
            self._end(job, ReportState.SUCCEEDED, None, None, installed=True, progress=100)
        else:
            detail = f"slot {req.target_slot} failed to boot; back on slot {st.slot} ({st.running_version})"
            rolled_back = ReportState.ROLLED_BACK
            self._end(job, rolled_back, ErrorCode.BOOT_FAILURE, detail, installed=True, progress=100)

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

    # ------------------------------------------------------------ reports
    def _finish(
        self,
        update_id: int,
        attempt: int,
        state: ReportState,
        error: ErrorCode | None,
        detail: str | None,
        *,
        installed: bool = False,
        progress: int = 0,
    ) -> None:
        st = self.state
        entry: dict[str, Any] = {"update_id": update_id, "attempt": attempt, "state": state.value}
        if error is not None:
            entry["error"] = error.value
        if detail:
            entry["detail"] = detail[:500]
        entry["progress"] = progress
        entry["installed"] = installed
        st.record_finished(entry)
        if self._job is not None and self._job.update_id == update_id:
            st.job = None
            self._job = None
        self._flush_held()
        self._report(update_id, attempt, state, progress, error, detail)  # also saves the state
        self._plan = None
        self.ctx.stats.finished[state.value] += 1
        if installed:
            self.link.send(info_topic(self.device_id), self._info_payload(), retain=True)

    def _end(
        self,
        job: Job,
        state: ReportState,
        error: ErrorCode | None = None,
        detail: str | None = None,
        *,
        installed: bool = False,
        progress: int = 0,
    ) -> None:
        self._finish(job.update_id, job.attempt, state, error, detail, installed=installed, progress=progress)

    def _report(
        self,
        update_id: int,
        attempt: int,
        state: ReportState,
        progress: int,
        error: ErrorCode | None = None,
        detail: str | None = None,
    ) -> None:
        st = self.state
        seq = st.next_seq()
        self.store.save(st)  # seq (and any phase change) must be durable before the report leaves
        payload = Report(
            update_id=update_id,
            attempt=attempt,
            state=state,
            seq=seq,
            progress=progress,
            running_version=st.running_version,
            error=error,
            detail=detail[:500] if detail else None,
            ts=time.time(),
        ).to_payload()
        self.ctx.stats.reports[state.value] += 1
        topic = report_topic(self.device_id)
        plan = self._plan
        if plan is not None and plan.rng is not None:
            if self._held is None and state in _HOLDABLE and plan.chance(plan.reorder):
                self._held = payload
                return
            self.link.send(topic, payload)
            self._flush_held()
            if plan.chance(plan.duplicate):
                self.link.send(topic, payload)
            return
        self.link.send(topic, payload)

    def _flush_held(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self.link.send(report_topic(self.device_id), held)

    def _info_payload(self) -> bytes:
        st = self.state
        return DeviceInfo(
            model=self.model,
            running_version=st.running_version,
            slot=st.slot,
            agent_version=AGENT_VERSION,
            labels=self.labels,
        ).to_payload()


def firmware_ref_from_manifest(manifest: dict[str, Any], url: str, token: str) -> FirmwareRef:
    """Build the ``firmware`` part of a desired document from a firmware_samples manifest."""
    return FirmwareRef(
        model=manifest["model"],
        version=manifest["version"],
        size=manifest["size"],
        sha256=manifest["sha256"],
        signature=manifest["signature"],
        url=url,
        token=token,
    )


if __name__ == "__main__":
    from device_sim.cli import agent_main

    agent_main()
