"""``fleet demo``: everything on one machine, a simulated fleet, and a 3-wave rollout to watch.

Starts a private Redis and MQTT broker on free ports, a SQLite database, the API, ingest, a Celery
worker and beat, plus N simulated devices; uploads the sample firmware, rolls it out in three
waves with live progress bars and prints a summary. Exit status 0 only if every device ended on
the new version.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from orchestrator.cli.rollout_cmds import watch_rollout
from orchestrator.config import DEV_PUBLIC_KEY, REPO_ROOT, Settings
from orchestrator.db import session_scope, upgrade_database
from orchestrator.embedded import RedisServer, cleanup_stale, start_broker
from orchestrator.local_stack import LocalStack, StackSettings, wait_until
from orchestrator.models import Device, DeviceUpdate
from orchestrator.services import rollout_service
from orchestrator.services.firmware_service import add_firmware
from orchestrator.services.policy import RolloutPolicy, Target
from orchestrator.services.rollout_planner import create_rollout
from orchestrator.worker.celery_app import use_redis

console = Console()
SAMPLES = REPO_ROOT / "firmware_samples"
DEMO_SPEED = {
    "bandwidth": "262144:1048576",
    "install_time": "0.5:2",
    "boot_time": "0.5:1.5",
    "offline_time": "0.5:1.5",
}


@contextlib.contextmanager
def _servers(data_dir: Path) -> Iterator[tuple[RedisServer, Any]]:
    run_dir = data_dir / "run"
    cleanup_stale(run_dir)
    redis_server = RedisServer(run_dir=run_dir).start()
    broker = None
    try:
        broker = start_broker(run_dir=run_dir)
        yield redis_server, broker
    finally:
        if broker is not None:
            broker.stop()
        redis_server.stop()


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
    data_dir: Path = typer.Option(Path("var/demo"), help="working directory (wiped at start)"),
    exit_when_done: bool = typer.Option(True, help="stop everything once the rollout ended"),
) -> None:
    """Run a complete rollout on an embedded stack with a simulated fleet."""
    from device_sim.fleet import FleetConfig, spawn_fleet

    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    data_dir = data_dir.resolve()
    database_url = f"sqlite:///{data_dir / 'fleet.db'}"
    image, manifest = _sample("sensor-v2", "1.1.0")
    with _servers(data_dir) as (redis_server, broker):
        console.print(f"[bold]redis[/] {redis_server.url}  [bold]mqtt[/] {broker.url} ({broker.kind})")
        upgrade_database(database_url)
        use_redis(redis_server.url)
        settings = StackSettings(
            data_dir=data_dir,
            database_url=database_url,
            redis_url=redis_server.url,
            mqtt_url=broker.url,
            shared_subscriptions=broker.supports_mqtt5,
        )
        with LocalStack(settings) as stack:
            with console.status("starting API, ingest, worker and beat…"):
                stack.start_all()
            console.print(f"[bold]API[/] {stack.api_url}/docs   logs in {stack.log_dir}")
            config = FleetConfig(
                broker_url=broker.url, devices=devices, model="sensor-v2", version="1.0.0", profile=profile
            )
            config.public_key = DEV_PUBLIC_KEY
            if profile != "instant":
                # Real downloads and reboots, sped up so the demo takes seconds, not minutes.
                config.params = dict(DEMO_SPEED)
            with console.status(f"connecting {devices} simulated devices…"):
                fleet = spawn_fleet(config)
            try:
                status = _run_rollout(database_url, stack, devices, image, manifest, waves)
                ok = _summary(database_url, devices, manifest["version"])
                if not exit_when_done:
                    console.print("stack keeps running; Ctrl-C stops everything")
                    with contextlib.suppress(KeyboardInterrupt):
                        signal.pause()
            finally:
                fleet.terminate()
                fleet.wait(30)
    console.print(f"rollout ended {status}; {'all devices updated' if ok else 'NOT all devices updated'}")
    if not ok:
        raise typer.Exit(1)


def _run_rollout(
    database_url: str,
    stack: LocalStack,
    devices: int,
    image: Path,
    manifest: dict[str, Any],
    waves: str,
) -> str:
    def registered() -> bool:
        with session_scope(database_url) as session:
            return (session.scalar(select(func.count()).select_from(Device)) or 0) >= devices

    if not wait_until(registered, timeout=120):
        console.print(f"[red]devices did not register in time[/]; see {stack.log_dir / 'ingest.log'}")
        raise typer.Exit(1)
    settings = Settings(
        database_url=database_url, firmware_dir=stack.settings.data_dir / "firmware", env="development"
    )
    specs: list[str | int] = [w.strip() for w in waves.split(",")]
    with session_scope(database_url) as session, image.open("rb") as stream:
        fw = add_firmware(
            session,
            settings,
            stream,
            model=manifest["model"],
            version=manifest["version"],
            signature=manifest["signature"],
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
