"""``fleet demo``: everything on one machine, a simulated fleet, and a 3-wave rollout to watch.

The same as ``fleet up --simulate N --demo --exit-when-done`` (see :mod:`orchestrator.cli.up_cmd`):
an embedded stack with a simulated fleet; this module uploads the sample firmware, rolls it out in
three waves with live progress bars and prints a summary. Exit status 0 only if every device ended
on the new version.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from orchestrator.cli.rollout_cmds import watch_rollout
from orchestrator.config import REPO_ROOT, Settings
from orchestrator.db import session_scope
from orchestrator.local_stack import wait_until
from orchestrator.models import Device, DeviceUpdate
from orchestrator.policy import RolloutPolicy, Target
from orchestrator.services import rollout_service
from orchestrator.services.firmware_service import add_firmware
from orchestrator.services.rollout_planner import create_rollout

console = Console()
SAMPLES = REPO_ROOT / "firmware_samples"
DEMO_SPEED = {
    "bandwidth": "262144:1048576",
    "install_time": "0.5:2",
    "boot_time": "0.5:1.5",
    "offline_time": "0.5:1.5",
}


def _sample(model: str, version: str) -> tuple[Path, dict[str, Any]]:
    manifest_path = SAMPLES / model / f"{version}.json"
    if not manifest_path.exists():
        raise typer.BadParameter(
            f"no sample firmware {manifest_path}; run `python firmware_samples/generate.py`"
        )
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    return SAMPLES / model / f"{version}.bin", manifest


def demo(
    devices: int = typer.Option(100, "--devices", "-n", help="simulated devices"),
    profile: str = typer.Option("realistic", help="simulator profile: instant, realistic, flaky"),
    waves: str = typer.Option("10%,50%,100%", help="wave sizes"),
    data_dir: Path = typer.Option(Path("var/demo"), help="working directory (reset at start)"),
    exit_when_done: bool = typer.Option(True, help="stop everything once the rollout ended"),
) -> None:
    """Run a complete rollout on an embedded stack with a simulated fleet (`fleet up --demo`)."""
    from orchestrator.cli.up_cmd import UpOptions, run_up

    options = UpOptions(
        simulate=devices,
        demo=True,
        exit_when_done=exit_when_done,
        data_dir=data_dir,
        profile=profile,
        waves=waves,
    )
    raise typer.Exit(run_up(options))


def run_demo(settings: Settings, data_dir: Path, devices: int, waves: str) -> bool:
    """Upload the sample firmware (signed with ``settings``' key), roll it out over ``devices``
    devices with live bars, print a summary; True if every device ended on the new version."""
    image, manifest = _sample("sensor-v2", "1.1.0")
    status = _run_rollout(settings, data_dir, devices, image, manifest, waves)
    ok = _summary(settings.database_url, devices, manifest["version"])
    console.print(f"rollout ended {status}; {'all devices updated' if ok else 'NOT all devices updated'}")
    return ok


def _run_rollout(
    settings: Settings,
    data_dir: Path,
    devices: int,
    image: Path,
    manifest: dict[str, Any],
    waves: str,
) -> str:
    database_url = settings.database_url

    def registered() -> bool:
        with session_scope(database_url) as session:
            return (session.scalar(select(func.count()).select_from(Device)) or 0) >= devices

    if not wait_until(registered, timeout=120):
        console.print(f"[red]devices did not register in time[/]; see {data_dir / 'logs' / 'ingest.log'}")
        return "NOT STARTED"
    specs: list[str | int] = [w.strip() for w in waves.split(",")]
    with session_scope(database_url) as session, image.open("rb") as stream:
        fw = add_firmware(
            session,
            settings,
            stream,
            model=manifest["model"],
            version=manifest["version"],
        )
        rollout = create_rollout(
            session,
            name=f"demo {fw.model} {fw.version}",
            firmware_id=fw.id,
            target=Target(model=fw.model),
            policy=RolloutPolicy(
                waves=specs, success_threshold=0.9, download_timeout_s=120, install_timeout_s=120
            ),
        )
        session.commit()
        rollout_service.start_rollout(session, rollout.id, actor="demo")
        rollout_id = rollout.id
    started = time.monotonic()
    status: str = watch_rollout(database_url, rollout_id, interval=0.3, timeout=600)
    console.print(f"rollout {rollout_id} {status} in {time.monotonic() - started:.1f}s")
    return status


def _summary(database_url: str, devices: int, version: str) -> bool:
    with session_scope(database_url) as session:
        states = session.execute(select(DeviceUpdate.state, func.count()).group_by(DeviceUpdate.state)).all()
        versions = session.execute(
            select(Device.firmware_version, func.count()).group_by(Device.firmware_version)
        ).all()
    table = Table("device update state", "count")
    for state, count in states:
        table.add_row(str(state), str(count))
    console.print(table)
    table = Table("running version", "devices")
    for running, count in versions:
        table.add_row(running, str(count))
    console.print(table)
    return dict(versions).get(version, 0) == devices
