"""The steps of one update (download, verify, install, reboot, confirm) and the reports they send.

A mixin of :class:`device_sim.agent.DeviceAgent`, kept apart so that the agent module holds the
reconciliation logic (what to do with a desired document) and this one how each step is done.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from device_sim.context import AGENT_VERSION, AgentContext
from device_sim.downloader import DownloadFailed, FileSink, HashSink, ImageSink, download, image_name
from device_sim.installer import InstallError, InstallRequest
from device_sim.mqtt_link import MqttLink
from device_sim.profiles import JobPlan, plan_job
from device_sim.state_store import AgentState, Job, Phase, StateStore
from orchestrator.protocol import (
    DeviceInfo,
    ErrorCode,
    Health,
    Report,
    ReportState,
    info_topic,
    report_topic,
    verify_manifest_signature,
)

# Reports a flaky device may hold back and send after the next one: only those that another
# report follows without any action of the orchestrator (VERIFIED waits for the install stage).
_HOLDABLE = frozenset(
    {ReportState.DOWNLOADING, ReportState.DOWNLOADED, ReportState.INSTALLING, ReportState.REBOOTING}
)


class UpdateSteps:
    """Update steps and reporting; the attributes below are DeviceAgent's (declared in its
    ``__slots__``; this class has none, so instances carry an unused ``__dict__`` pointer)."""

    device_id: str
    model: str
    labels: dict[str, str]
    ctx: AgentContext
    store: StateStore
    state: AgentState
    link: MqttLink
    _job: Job | None
    _plan: JobPlan | None
    _held: bytes | None
    _last_report: bytes | None

    # ------------------------------------------------------------ steps
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
        self.state.boot_count += 1
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
        *,
        health: Health | None = None,
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
            health=health,
        ).to_payload()
        stats = self.ctx.stats
        stats.reports[state.value] += 1
        if stats.sent is not None:
            stats.sent.setdefault(self.device_id, []).append(seq)
        self._last_report = payload
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
