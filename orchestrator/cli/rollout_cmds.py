"""CLI for firmware, rollouts and devices, straight over the service layer and database."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table
from sqlalchemy import func, select

from orchestrator.config import get_settings
from orchestrator.db import session_scope
from orchestrator.models import Device, Firmware, Rollout
from orchestrator.portal import rollout_summary
from orchestrator.services import rollout_service
from orchestrator.services.firmware_service import add_firmware
from orchestrator.services.policy import RolloutPolicy, Target
from orchestrator.services.rollout_planner import create_rollout

firmware_app = typer.Typer(help="Firmware images.", no_args_is_help=True)
rollout_app = typer.Typer(help="Rollouts.", no_args_is_help=True)
devices_app = typer.Typer(help="Device inventory.", no_args_is_help=True)
console = Console()


@firmware_app.command("add")
def firmware_add(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    model: str = typer.Option(..., "--model", "-m"),
    version: str = typer.Option(..., "--version", "-v"),
    signature: str = typer.Option(None, help="base64 ed25519 signature; default: signed with the server key"),
) -> None:
    """Register a firmware image (stored content-addressed, signed)."""
    settings = get_settings()
    with session_scope(settings.database_url) as session, file.open("rb") as stream:
        fw = add_firmware(session, settings, stream, model=model, version=version, signature=signature)
        console.print(
            f"firmware [bold]{fw.id}[/]: {fw.model} {fw.version}, {fw.size} bytes, sha256 {fw.sha256[:16]}…"
        )


@firmware_app.command("list")
def firmware_list() -> None:
    with session_scope(get_settings().database_url) as session:
        table = Table("id", "model", "version", "size", "sha256")
        for fw in session.scalars(select(Firmware).order_by(Firmware.id)):
            table.add_row(str(fw.id), fw.model, fw.version, str(fw.size), fw.sha256[:16] + "…")
        console.print(table)


@rollout_app.command("create")
def rollout_create(
    firmware_id: int = typer.Option(..., "--firmware", "-f", help="firmware id"),
    name: str = typer.Option(None, help="default: '<model> <version>'"),
    model: str = typer.Option(None, help="target every device of this model"),
    label: list[str] = typer.Option([], help="k=v label filters with --model"),
    device: list[str] = typer.Option([], help="explicit device ids (repeat)"),
    waves: str = typer.Option("1%,10%,100%", help="comma-separated percents or counts"),
    success_threshold: float = typer.Option(0.95),
    failure_threshold_percent: float = typer.Option(None),
    failure_threshold_count: int = typer.Option(None),
    max_in_flight: int = typer.Option(1000),
    max_attempts: int = typer.Option(2),
    start: bool = typer.Option(True, help="start at once (else stays SCHEDULED)"),
    start_at: datetime = typer.Option(None, help="ISO time with zone to start at"),
) -> None:
    """Plan a rollout and (by default) start it."""
    specs: list[str | int] = [int(w) if w.strip().isdigit() else w.strip() for w in waves.split(",")]
    policy = RolloutPolicy(
        waves=specs,
        success_threshold=success_threshold,
        failure_threshold_percent=failure_threshold_percent,
        failure_threshold_count=failure_threshold_count,
        max_in_flight=max_in_flight,
        max_attempts=max_attempts,
    )
    labels = dict(item.split("=", 1) for item in label)
    target = Target(device_ids=device or None, model=model, labels=labels)
    with session_scope(get_settings().database_url) as session:
        fw = session.get(Firmware, firmware_id)
        rollout = create_rollout(
            session,
            name=name or (f"{fw.model} {fw.version}" if fw else "rollout"),
            firmware_id=firmware_id,
            target=target,
            policy=policy,
            start_at=start_at,
        )
        session.commit()
        if start and start_at is None:
            rollout_service.start_rollout(session, rollout.id, actor="cli")
        console.print(f"rollout [bold]{rollout.id}[/] {rollout.status}: {rollout.total} devices")


@rollout_app.command("list")
def rollout_list() -> None:
    with session_scope(get_settings().database_url) as session:
        table = Table("id", "name", "status", "devices", "created")
        for r in session.scalars(select(Rollout).order_by(Rollout.id.desc()).limit(50)):
            table.add_row(
                str(r.id), r.name, str(r.status), str(r.total), r.created_at.isoformat(timespec="seconds")
            )
        console.print(table)


@rollout_app.command("status")
def rollout_status(rollout_id: int, as_json: bool = typer.Option(False, "--json")) -> None:
    with session_scope(get_settings().database_url) as session:
        summary = rollout_summary(session, rollout_id)
        if summary is None:
            console.print(f"[red]rollout {rollout_id} does not exist[/]; see `fleet rollout list`")
            raise typer.Exit(1)
        if as_json:
            console.print_json(summary.model_dump_json())
            return
        console.print(f"rollout {rollout_id} [bold]{summary.status}[/] {summary.percent}% done")
        console.print(json.dumps(summary.counts))


def _action(name: str, rollout_id: int) -> None:
    with session_scope(get_settings().database_url) as session:
        rollout = getattr(rollout_service, f"{name}_rollout")(session, rollout_id, actor="cli")
        console.print(f"rollout {rollout_id} is now {rollout.status}")


@rollout_app.command("pause")
def rollout_pause(rollout_id: int) -> None:
    """No new device starts; devices already updating finish."""
    _action("pause", rollout_id)


@rollout_app.command("resume")
def rollout_resume(rollout_id: int) -> None:
    _action("resume", rollout_id)


@rollout_app.command("abort")
def rollout_abort(rollout_id: int) -> None:
    """Cancel every device that has not started; started devices finish."""
    _action("abort", rollout_id)


@rollout_app.command("watch")
def rollout_watch(rollout_id: int, interval: float = 0.5) -> None:
    """Live progress bars per wave until the rollout ends."""
    watch_rollout(get_settings().database_url, rollout_id, interval=interval)


def watch_rollout(
    database_url: str, rollout_id: int, *, interval: float = 0.5, timeout: float | None = None
) -> str:
    """Render per-wave bars from SQL until the rollout is COMPLETED/HALTED/ABORTED; returns the status."""
    started = time.monotonic()
    bars: dict[int, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=console,
    ) as progress:
        overall = progress.add_task("all devices", total=1)
        while True:
            with session_scope(database_url) as session:
                summary = rollout_summary(session, rollout_id)
            if summary is None:
                raise typer.BadParameter(f"rollout {rollout_id} does not exist")
            done = sum(int(w["done"]) for w in summary.waves)
            eligible = sum(int(w["size"]) for w in summary.waves)
            progress.update(
                overall, total=max(eligible, 1), completed=done, description=f"rollout {summary.status}"
            )
            for wave in summary.waves:
                index = int(wave["index"])
                if index not in bars:
                    bars[index] = progress.add_task(f"wave {index}", total=int(wave["size"]))
                progress.update(
                    bars[index], completed=int(wave["done"]), description=f"wave {index} {wave['status']}"
                )
            if summary.status in ("COMPLETED", "HALTED", "ABORTED"):
                return summary.status
            if timeout is not None and time.monotonic() - started > timeout:
                return summary.status
            time.sleep(interval)


@devices_app.command("list")
def devices_list(model: str = typer.Option(None), limit: int = typer.Option(50)) -> None:
    with session_scope(get_settings().database_url) as session:
        query = select(Device).order_by(Device.id).limit(limit)
        if model:
            query = query.where(Device.model == model)
        table = Table("id", "model", "version", "online", "last seen")
        for d in session.scalars(query):
            seen = d.last_seen.isoformat(timespec="seconds") if d.last_seen else "-"
            table.add_row(d.id, d.model, d.firmware_version, "yes" if d.online else "no", seen)
        console.print(table)
        total = session.scalar(select(func.count()).select_from(Device))
        console.print(f"{total} devices in total")
