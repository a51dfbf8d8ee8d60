"""Operator CLI for firmware, rollouts and devices, through the HTTP API with a bearer token.

The API is found at ``--api-url``, else FLEET_API_URL, else the ``fleet up`` running from this
directory (``var/up/stack.json``); the token likewise (``--token``, FLEET_API_TOKEN, the stack's).
``fleet rollout watch`` follows the retained MQTT portal topics instead.
:func:`watch_rollout` (progress from SQL) serves ``fleet demo``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from orchestrator.cli import policy_options
from orchestrator.cli.api_client import ApiClient, ApiError
from orchestrator.cli.watch import WatchError, watch_rollout_portal
from orchestrator.config import get_settings
from orchestrator.db import session_scope
from orchestrator.portal import rollout_summary

firmware_app = typer.Typer(help="Firmware images.", no_args_is_help=True)
rollout_app = typer.Typer(help="Rollouts.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url",
        help="API base URL (default FLEET_API_URL, else the `fleet up` running from this directory)",
        show_default=False,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token", help="API token (default FLEET_API_TOKEN, else that `fleet up`'s)", show_default=False
    ),
]


@contextmanager
def connect(api_url: str | None, token: str | None) -> Iterator[ApiClient]:
    """An API client; an :class:`ApiError` inside the block is printed and exits with status 1."""
    try:
        with ApiClient.from_settings(get_settings(), api_url=api_url, token=token) as client:
            yield client
    except ApiError as exc:
        err.print(f"[red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc


def fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def _short(sha: str) -> str:
    return sha[:16] + "…"


def short_time(value: Any) -> str:
    return str(value)[:19].replace("T", " ") if value else "-"


# ---------------------------------------------------------------- firmware
@firmware_app.command("add")
def firmware_add(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    model: str = typer.Option(..., "--model", "-m"),
    version: str = typer.Option(..., "--version", "-v"),
    signature: str = typer.Option(None, help="base64 ed25519 signature; default: signed with the server key"),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Upload a firmware image (stored content-addressed, signed)."""
    size = file.stat().st_size
    with (
        connect(api_url, token) as client,
        Progress(
            TextColumn("uploading {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as progress,
    ):
        task = progress.add_task(file.name, total=size)
        fw = client.upload_firmware(
            file,
            model=model,
            version=version,
            signature=signature,
            on_progress=lambda n: progress.advance(task, n),
        )
    console.print(
        f"firmware [bold]{fw['id']}[/]: {fw['model']} {fw['version']}, {fw['size']} bytes, "
        f"sha256 {_short(fw['sha256'])}",
        highlight=False,
    )


@firmware_app.command("list")
def firmware_list(
    model: str = typer.Option(None, help="only images for this model"),
    limit: int = typer.Option(100, min=1),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Firmware images in upload order."""
    params = {"model": model} if model else {}
    with connect(api_url, token) as client:
        table = Table("id", "model", "version", "size", "sha256", "uploaded")
        for fw in client.pages("/v1/firmware", params, limit):
            table.add_row(
                str(fw["id"]),
                fw["model"],
                fw["version"],
                str(fw["size"]),
                _short(fw["sha256"]),
                short_time(fw["created_at"]),
            )
    console.print(table)


# ---------------------------------------------------------------- rollouts
def parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"--label {item!r}: write it as key=value, e.g. --label site=berlin")
        labels[key] = value
    return labels


@rollout_app.command("create")
def rollout_create(
    firmware_id: int = typer.Option(..., "--firmware", "-f", help="firmware id (see `fleet firmware list`)"),
    name: str = typer.Option(None, help="default: '<model> <version>'"),
    model: str = typer.Option(None, help="target every device of this model"),
    group: str = typer.Option(None, help="target a saved group (see `fleet group list`)"),
    device: list[str] = typer.Option([], help="explicit device id (repeat)"),
    label: list[str] = typer.Option([], help="k=v label filter with --model or --group (repeat)"),
    tag: list[str] = typer.Option([], help="operator tag filter with --model or --group (repeat)"),
    versions: str = typer.Option(None, help="running versions that qualify, e.g. '>=1.0,<1.1'"),
    waves: str = typer.Option("1%,10%,100%", help="comma-separated cumulative percents or device counts"),
    success_threshold: float = typer.Option(0.95, help="share of a wave's finished devices to succeed"),
    failure_threshold_percent: float = typer.Option(None, help="halt when this % of finished devices failed"),
    failure_threshold_count: int = typer.Option(None, help="halt after this many failed devices"),
    max_in_flight: int = typer.Option(1000),
    max_attempts: int = typer.Option(2),
    window: list[str] = typer.Option(
        [], help="install only inside: 'CRON;DURATION[;ZONE]' or 'START..END' (repeat)"
    ),
    rate: int = typer.Option(None, help="offers per minute to start with"),
    rate_factor: float = typer.Option(2.0, help="multiply the rate by this on each ramp step"),
    rate_every_succeeded: int = typer.Option(None, help="ramp step after this many more successes"),
    rate_max: int = typer.Option(None, help="highest rate (offers per minute)"),
    end_at: str = typer.Option(None, help="ISO time: no offer after it; devices not reached are skipped"),
    continuous: bool = typer.Option(
        False, "--continuous", help="devices matching later join, until --end-at"
    ),
    soak: str = typer.Option(None, help="after success each device must stay healthy this long, e.g. 10m"),
    soak_heartbeat: str = typer.Option("30s", help="how often a soaking device reports its health"),
    policy_file: Path = typer.Option(None, help="JSON policy; the options above override its fields"),
    start_at: str = typer.Option(None, help="ISO time with zone to start at, e.g. 2030-01-01T02:00:00+00:00"),
    supersede: bool = typer.Option(
        False,
        "--supersede",
        help="take over devices updating in another rollout: cancel it there where it has not started",
    ),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Plan a rollout; it starts at once, or at --start-at."""
    if sum(map(bool, (model, group, device))) != 1:
        raise fail("give one of --model, --group or --device ID (repeat) to say which devices to update")
    if (label or tag) and device:
        raise fail("--label and --tag filter --model or --group; they do not apply to --device")
    target: dict[str, Any] = (
        {"device_ids": device} if device else {"model": model} if model else {"group": group}
    )
    if label:
        target["labels"] = parse_labels(label)
    if tag:
        target["tags"] = tag
    if versions:
        target["versions"] = versions
    specs: list[str | int] = [int(w) if w.strip().isdigit() else w.strip() for w in waves.split(",")]
    try:
        policy = policy_options.policy_file(policy_file)
        policy.update(
            waves=specs,
            success_threshold=success_threshold,
            max_in_flight=max_in_flight,
            max_attempts=max_attempts,
        )
        policy.update(policy_options.rate(rate, rate_factor, rate_every_succeeded, rate_max))
        if window:
            policy["windows"] = [policy_options.window(w) for w in window]
        if end_at:
            policy["end_at"] = policy_options.aware_time(end_at, "--end-at")
        if continuous:
            policy["continuous"] = True
        if soak:
            policy["soak"] = {
                "duration_s": policy_options.duration_s(soak, "--soak"),
                "heartbeat_s": policy_options.duration_s(soak_heartbeat, "--soak-heartbeat"),
            }
        start = policy_options.aware_time(start_at, "--start-at") if start_at else None
    except policy_options.OptionError as exc:
        raise fail(str(exc)) from None
    if failure_threshold_percent is not None:
        policy["failure_threshold_percent"] = failure_threshold_percent
    if failure_threshold_count is not None:
        policy["failure_threshold_count"] = failure_threshold_count
    body: dict[str, Any] = {"firmware_id": firmware_id, "target": target, "policy": policy}
    if supersede:
        body["supersede"] = True
    if start:
        body["start_at"] = start
    with connect(api_url, token) as client:
        if name is None:
            fw = client.firmware(firmware_id)
            name = f"{fw['model']} {fw['version']}"
        body["name"] = name
        rollout = client.create_rollout(body)
    console.print(
        f"rollout [bold]{rollout['id']}[/] {rollout['status']}: {rollout['total']} devices "
        f"(follow it with `fleet rollout watch {rollout['id']}`)",
        highlight=False,
    )


@rollout_app.command("list")
def rollout_list(
    status: str = typer.Option(None, help="only rollouts in this status, e.g. RUNNING"),
    limit: int = typer.Option(50, min=1),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Rollouts, newest first."""
    params = {"status": status.upper()} if status else {}
    with connect(api_url, token) as client:
        table = Table("id", "name", "status", "devices", "created", "finished")
        for r in client.pages("/v1/rollouts", params, limit):
            table.add_row(
                str(r["id"]),
                r["name"],
                r["status"],
                str(r["total"]),
                short_time(r["created_at"]),
                short_time(r["finished_at"]),
            )
    console.print(table)


@rollout_app.command("status")
def rollout_status(
    rollout_id: int,
    as_json: bool = typer.Option(False, "--json", help="print the API's document as JSON"),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Status, per-wave progress and counts per state."""
    with connect(api_url, token) as client:
        detail = client.rollout(rollout_id)
    if as_json:
        typer.echo(json.dumps(detail, indent=2))
        return
    eta = detail.get("eta_seconds")
    eta_text = f", eta {eta:.0f}s" if eta is not None and detail["status"] == "RUNNING" else ""
    console.print(
        f"rollout {rollout_id} '{detail['name']}' [bold]{detail['status']}[/] "
        f"{detail['percent']:.1f}% done of {detail['total']} devices{eta_text}",
        highlight=False,
    )
    if detail.get("reason"):
        console.print(f"reason: {detail['reason']}", highlight=False)
    waves = Table("wave", "status", "devices", "done", "succeeded")
    for w in detail["waves"]:
        waves.add_row(str(w["index"]), w["status"], str(w["size"]), str(w["done"]), str(w["succeeded"]))
    console.print(waves)
    counts = Table("state", "devices")
    for state, count in sorted(detail["counts"].items(), key=lambda kv: -kv[1]):
        counts.add_row(state, str(count))
    console.print(counts)
    if detail.get("skipped"):
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(detail["skipped"].items()))
        console.print(f"skipped: {reasons}", highlight=False)
    for line in pacing_lines(detail.get("pacing")):
        console.print(line, highlight=False)


def pacing_lines(pacing: dict[str, Any] | None) -> list[str]:
    """What holds the rollout back, in words (rate, window, offline devices, end time)."""
    if not pacing:
        return []
    lines: list[str] = []
    if pacing.get("rate_per_minute") is not None:
        rate, recent = pacing["rate_per_minute"], pacing["offered_last_minute"]
        lines.append(f"rate: {rate} offers/min now, {recent} in the last minute")
    if pacing.get("window_open") is not None:
        if pacing["window_open"]:
            lines.append(f"window: open until {short_time(pacing.get('window_closes_at'))}")
        else:
            lines.append(f"window: closed, next opens {short_time(pacing.get('next_window_at'))}")
        if pacing.get("waiting_for_window"):
            lines.append(f"waiting for the window to install: {pacing['waiting_for_window']}")
    if pacing.get("waiting_offline"):
        lines.append(f"waiting for offline devices: {pacing['waiting_offline']}")
    if pacing.get("soaking"):
        lines.append(f"soaking: {pacing['soaking']} devices reporting health")
    if pacing.get("end_at"):
        kind = "continuous until" if pacing.get("continuous") else "ends"
        lines.append(f"{kind} {short_time(pacing['end_at'])}")
    elif pacing.get("continuous"):
        lines.append("continuous: devices that match later join it")
    return lines


def _action(name: str, rollout_id: int, api_url: str | None, token: str | None) -> None:
    with connect(api_url, token) as client:
        rollout = client.rollout_action(rollout_id, name)
    console.print(f"rollout {rollout_id} is now [bold]{rollout['status']}[/]", highlight=False)


@rollout_app.command("pause")
def rollout_pause(rollout_id: int, api_url: ApiUrl = None, token: Token = None) -> None:
    """No new device starts; devices already updating finish."""
    _action("pause", rollout_id, api_url, token)


@rollout_app.command("resume")
def rollout_resume(rollout_id: int, api_url: ApiUrl = None, token: Token = None) -> None:
    """Continue a paused rollout."""
    _action("resume", rollout_id, api_url, token)


@rollout_app.command("abort")
def rollout_abort(rollout_id: int, api_url: ApiUrl = None, token: Token = None) -> None:
    """Cancel every device that has not started; started devices finish."""
    _action("abort", rollout_id, api_url, token)


@rollout_app.command("watch")
def rollout_watch(
    rollout_id: int,
    broker: str = typer.Option(None, help="MQTT broker URL (default FLEET_MQTT_URL)"),
    username: str = typer.Option(
        None, help="broker user (default FLEET_PORTAL_MQTT_USERNAME, else FLEET_MQTT_USERNAME)"
    ),
    password: str = typer.Option(None, help="broker password (default the matching *_PASSWORD)"),
    timeout: float = typer.Option(None, help="stop after this many seconds"),
) -> None:
    """Live progress bars per wave and per state from the portal topics, until the rollout ends.

    Exits 0 when it COMPLETED (or on Ctrl-C / --timeout), 1 when it HALTED or was ABORTED.
    """
    from orchestrator.cli.stack_discovery import resolve_broker

    url, user, secret = resolve_broker(get_settings(), broker, username, password)
    try:
        status = watch_rollout_portal(
            url,
            rollout_id,
            username=user,
            password=secret,
            timeout=timeout,
            console=console,
        )
    except WatchError as exc:
        raise fail(str(exc)) from exc
    if status in ("HALTED", "ABORTED"):
        raise typer.Exit(1)


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
