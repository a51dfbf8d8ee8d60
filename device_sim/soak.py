"""After an update: health heartbeats while it soaks, and the rollback to the previous slot.

A mixin of :class:`device_sim.agent.DeviceAgent`. The desired document's stage says what the
orchestrator wants once the device runs the new version: ``soak`` (report health every
``heartbeat_s`` until the document changes) or ``rollback`` (the soak found it unhealthy: boot
back into the previous slot and report ROLLED_BACK). Neither touches an update in progress, and a
rollback is done at most once per update: the finished entry records it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from device_sim.installer import InstallError, InstallRequest
from device_sim.profiles import plan_job
from device_sim.steps import UpdateSteps
from orchestrator.protocol import Desired, ErrorCode, Health, ReportState, Stage, info_topic

log = logging.getLogger(__name__)


class SoakSteps(UpdateSteps):
    """Soak heartbeats and rollback; the attributes below are DeviceAgent's."""

    _heartbeat: asyncio.Task[None] | None
    _booted_at: float

    def _republish(self, done: dict[str, Any], attempt: int) -> None:
        raise NotImplementedError  # DeviceAgent's

    def _after_install(self, d: Desired) -> None:
        """A ``soak`` or ``rollback`` document for an update this device finished."""
        done = self.state.find_finished(d.update_id)
        if done is None or not done.get("installed"):
            log.warning(
                "%s: %s for update %s it never installed: ignored", self.device_id, d.stage, d.update_id
            )
            return
        if done["state"] != ReportState.SUCCEEDED.value:
            self._stop_heartbeats()
            self._republish(done, done["attempt"])  # e.g. ROLLED_BACK already: say so again
            return
        running = self._heartbeat
        if (
            running is not None
            and not running.done()
            and getattr(running, "job", None) == (d.update_id, d.stage)
        ):
            return  # already beating for this update, or already rolling it back
        if self._rollback_in_progress() is not None:
            return  # a rollback is a reboot: nothing else starts before it ends
        self._stop_heartbeats()
        work = self._beat(done, d.heartbeat_s or 30.0) if d.stage is Stage.SOAK else self._roll_back(done)
        task = asyncio.get_running_loop().create_task(work)
        task.job = (d.update_id, d.stage)  # type: ignore[attr-defined]
        self._heartbeat = task

    def _stop_heartbeats(self, *, force: bool = False) -> None:
        """Stop the soak's heartbeats. A rollback under way is a reboot: it is left to finish unless
        ``force`` (the process is going down)."""
        task = self._heartbeat
        if task is None:
            return
        rolling_back = getattr(task, "job", (None, None))[1] is Stage.ROLLBACK and not task.done()
        if rolling_back and not force:
            return
        self._heartbeat = None
        task.cancel()

    def _rollback_in_progress(self) -> asyncio.Task[None] | None:
        task = self._heartbeat
        if task is not None and not task.done() and getattr(task, "job", (None, None))[1] is Stage.ROLLBACK:
            return task
        return None

    def _health_request(self, done: dict[str, Any]) -> InstallRequest:
        plan = plan_job(self.ctx.profile, self.ctx.seed, self.device_id, done["update_id"], done["attempt"])
        return InstallRequest(
            device_id=self.device_id,
            update_id=done["update_id"],
            attempt=done["attempt"],
            model=self.model,
            version=self.state.running_version,
            sha256=done.get("sha256", ""),
            image=None,
            target_slot=self.state.slot,
            plan=plan,
        )

    async def _beat(self, done: dict[str, Any], every: float) -> None:
        while True:
            healthy = await self.ctx.installer.app_healthy(self._health_request(done))
            health = Health(
                boot_count=self.state.boot_count,
                uptime_s=round(time.monotonic() - self._booted_at, 1),
                app_healthy=healthy,
            )
            self._report(done["update_id"], done["attempt"], ReportState.SUCCEEDED, 100, health=health)
            await asyncio.sleep(every)

    async def _roll_back(self, done: dict[str, Any]) -> None:
        st = self.state
        previous_slot = "a" if st.slot == "b" else "b"
        req = dataclasses.replace(
            self._health_request(done), target_slot=previous_slot, version=st.previous_version or ""
        )
        try:
            await self.ctx.installer.rollback(req)
        except InstallError as exc:
            log.error("%s: rollback of update %s failed: %s", self.device_id, done["update_id"], exc)
            return  # the orchestrator's rollback deadline ends the update
        if st.previous_version is not None:
            st.running_version, st.previous_version = st.previous_version, st.running_version
        st.slot = previous_slot  # type: ignore[assignment]
        st.boot_count += 1
        self._booted_at = time.monotonic()
        entry = {**done, "state": ReportState.ROLLED_BACK.value, "error": ErrorCode.HEALTH.value}
        entry["detail"] = f"unhealthy after the update; back on slot {st.slot} ({st.running_version})"
        st.record_finished(entry)
        self.ctx.stats.finished[ReportState.ROLLED_BACK.value] += 1
        self._report(
            done["update_id"],
            done["attempt"],
            ReportState.ROLLED_BACK,
            100,
            ErrorCode.HEALTH,
            entry["detail"],
        )
        self.link.send(info_topic(self.device_id), self._info_payload(), retain=True)
