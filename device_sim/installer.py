"""Installers: what actually writes a verified image into the inactive slot and boots it.

The agent drives three steps and persists its phase before each, so a restart resumes correctly:
``install`` (write the inactive slot), ``reboot`` (switch to it) and ``confirm_boot`` (did the new
slot come up? if not, the bootloader fell back to the old one).
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from device_sim.profiles import JobPlan


class InstallError(Exception):
    """The installer failed; the inactive slot is unusable and the old version keeps running."""


@dataclass(frozen=True, slots=True)
class InstallRequest:
    device_id: str
    update_id: int
    attempt: int
    model: str
    version: str
    sha256: str
    image: Path | None  # None for simulated devices that keep no image bytes
    target_slot: str
    plan: JobPlan


class Installer(Protocol):
    async def install(self, req: InstallRequest) -> None:
        """Write the image into ``req.target_slot``. Raise InstallError on failure."""
        ...

    async def reboot(self, req: InstallRequest) -> None:
        """Boot into the target slot (a real reboot may end this process)."""
        ...

    async def confirm_boot(self, req: InstallRequest) -> bool:
        """True when the device runs the new slot; False when it fell back to the old one."""
        ...

    async def app_healthy(self, req: InstallRequest) -> bool:
        """Whether the application on the updated slot is healthy (asked at every soak heartbeat)."""
        ...

    async def rollback(self, req: InstallRequest) -> None:
        """Boot back into ``req.target_slot``, the previous one (A/B fallback on command)."""
        ...


class SimulatedInstaller:
    """Sleeps for the planned install and boot times and injects the planned failures.

    ``installs`` counts calls to install() per (device id, update id): tests use it to check that
    an update is never installed twice, including across agent restarts.
    """

    def __init__(self) -> None:
        self.installs: Counter[tuple[str, int]] = Counter()
        self.rollbacks: Counter[tuple[str, int]] = Counter()

    @property
    def total_installs(self) -> int:
        return sum(self.installs.values())

    async def install(self, req: InstallRequest) -> None:
        self.installs[(req.device_id, req.update_id)] += 1
        if req.plan.install_time:
            await asyncio.sleep(req.plan.install_time)
        if req.plan.install_error:
            raise InstallError("simulated installer failure")

    async def reboot(self, req: InstallRequest) -> None:
        if req.plan.boot_time:
            await asyncio.sleep(req.plan.boot_time)

    async def confirm_boot(self, req: InstallRequest) -> bool:
        return not req.plan.boot_failure

    async def app_healthy(self, req: InstallRequest) -> bool:
        return not req.plan.unhealthy

    async def rollback(self, req: InstallRequest) -> None:
        self.rollbacks[(req.device_id, req.update_id)] += 1
        if req.plan.boot_time:
            await asyncio.sleep(req.plan.boot_time)


class CommandInstaller:
    """Runs shell-free commands, for driving a real device's updater.

    ``install_cmd`` gets the image path: in place of ``{image}`` if present, else as the last
    argument. Exit code 0 means success. The environment carries FLEET_DEVICE_ID,
    FLEET_UPDATE_ID, FLEET_VERSION, FLEET_SHA256 and FLEET_TARGET_SLOT.
    ``reboot_cmd`` (optional) is run after a successful install; on a real device it reboots, and
    the restarted agent then calls ``confirm_boot``. ``confirm_cmd`` (optional) decides whether the
    new slot is running (exit 0 = yes); without it the boot is taken as confirmed.
    ``health_cmd`` (optional) answers a soak's health question (exit 0 = healthy; without it the
    device is taken as healthy); ``rollback_cmd`` switches back to ``FLEET_TARGET_SLOT``, the
    previous slot, when a soak found the update unhealthy.
    """

    def __init__(
        self,
        install_cmd: str,
        *,
        reboot_cmd: str | None = None,
        confirm_cmd: str | None = None,
        health_cmd: str | None = None,
        rollback_cmd: str | None = None,
        timeout: float = 1800.0,
    ) -> None:
        self.install_cmd = install_cmd
        self.reboot_cmd = reboot_cmd
        self.confirm_cmd = confirm_cmd
        self.health_cmd = health_cmd
        self.rollback_cmd = rollback_cmd
        self.timeout = timeout

    async def install(self, req: InstallRequest) -> None:
        if req.image is None:
            raise InstallError("no image file to install (the agent keeps images only with a state dir)")
        code, output = await self._run(self.install_cmd, req)
        if code != 0:
            raise InstallError(f"install command exited with {code}: {output[-300:]}")

    async def reboot(self, req: InstallRequest) -> None:
        if self.reboot_cmd:
            code, output = await self._run(self.reboot_cmd, req)
            if code != 0:
                raise InstallError(f"reboot command exited with {code}: {output[-300:]}")

    async def confirm_boot(self, req: InstallRequest) -> bool:
        if not self.confirm_cmd:
            return True
        code, _ = await self._run(self.confirm_cmd, req)
        return code == 0

    async def app_healthy(self, req: InstallRequest) -> bool:
        if not self.health_cmd:
            return True
        code, _ = await self._run(self.health_cmd, req)
        return code == 0

    async def rollback(self, req: InstallRequest) -> None:
        if not self.rollback_cmd:
            raise InstallError("told to roll back, but the agent runs without --rollback-cmd")
        code, output = await self._run(self.rollback_cmd, req)
        if code != 0:
            raise InstallError(f"rollback command exited with {code}: {output[-300:]}")

    async def _run(self, command: str, req: InstallRequest) -> tuple[int, str]:
        image = str(req.image) if req.image else ""
        args = shlex.split(command)
        if any("{image}" in a for a in args):
            args = [a.replace("{image}", image) for a in args]
        elif command is self.install_cmd:
            args.append(image)
        env = dict(os.environ)
        env.update(
            FLEET_DEVICE_ID=req.device_id,
            FLEET_UPDATE_ID=str(req.update_id),
            FLEET_VERSION=req.version,
            FLEET_SHA256=req.sha256,
            FLEET_TARGET_SLOT=req.target_slot,
        )
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1, f"timed out after {self.timeout:.0f}s"
        except asyncio.CancelledError:
            # The agent is going down: leave no command running behind it.
            if proc.returncode is None:
                proc.kill()
            raise
        return proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace")
