"""Command line: ``fleet sim`` (a simulated fleet) and ``python -m device_sim.agent`` (one agent).

``app`` has its options on the callback, so it works both standalone (``python -m device_sim
--devices 100``) and mounted into another Typer app (``app.add_typer(cli.app, name="sim")`` gives
``fleet sim --devices 100``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from device_sim.agent import DeviceAgent
from device_sim.context import AgentContext, load_public_key
from device_sim.fleet import DEV_PUBLIC_KEY, READY_PREFIX, FleetConfig, SimulatedFleet, raise_nofile_limit
from device_sim.installer import CommandInstaller, Installer, SimulatedInstaller
from device_sim.mqtt_link import BrokerAddress
from device_sim.profiles import PROFILES, RATE_NAMES, get_profile, parse_assignments
from device_sim.state_store import JsonStateStore
from orchestrator.protocol import is_reserved_device_id

err = Console(stderr=True)
app = typer.Typer(
    help="Run a simulated device fleet against an MQTT broker.",
    add_completion=False,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)


def _split_pairs(values: list[str]) -> dict[str, str]:
    items = [part for value in values for part in value.split(",") if part.strip()]
    try:
        return parse_assignments(items)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _rates(values: list[str]) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in _split_pairs(values).items()}
    except ValueError as exc:
        raise typer.BadParameter(f"failure rates must be numbers: {exc}") from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.callback(invoke_without_command=True)
def sim(
    devices: Annotated[int, typer.Option("--devices", "-n", min=0, help="Number of devices.")] = 10,
    model: Annotated[str, typer.Option(help="Hardware model of every device.")] = "sensor-v2",
    version: Annotated[str, typer.Option(help="Factory firmware version (first start only).")] = "1.0.0",
    profile: Annotated[str, typer.Option(help=f"Behaviour: {', '.join(PROFILES)}.")] = "instant",
    broker: Annotated[str, typer.Option(envvar="FLEET_MQTT_URL", help="mqtt://host:port")] = (
        "mqtt://127.0.0.1:1883"
    ),
    seed: Annotated[int, typer.Option(help="Seed for every random draw.")] = 0,
    state_dir: Annotated[
        Path | None, typer.Option(help="Persist each device's state in DIR/<id>/ (default: memory).")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option(help="Firmware-signing public key (PEM); default: the dev key.")
    ] = None,
    id_prefix: Annotated[str, typer.Option(help="Device ids are PREFIX + zero-padded index.")] = "sim-",
    first_index: Annotated[int, typer.Option(min=0, help="Index of the first device.")] = 0,
    labels: Annotated[list[str] | None, typer.Option(help="k=v labels (repeat or comma-separate).")] = None,
    password: Annotated[
        str | None, typer.Option(envvar="FLEET_DEVICE_PASSWORD", help="MQTT password of every device.")
    ] = None,
    password_secret: Annotated[
        str | None,
        typer.Option(
            envvar="FLEET_DEVICE_PASSWORD_SECRET",
            help="Per-device MQTT passwords: hex HMAC-SHA256(secret, device id); overrides --password.",
        ),
    ] = None,
    fail_rate: Annotated[
        list[str] | None,
        typer.Option(help=f"Override a failure rate: NAME=P, NAME in {', '.join(RATE_NAMES)}."),
    ] = None,
    set_param: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a profile parameter, e.g. install_time=1:3, bandwidth=none."),
    ] = None,
    fetch: Annotated[str | None, typer.Option(help="http (real download) or skip (no transfer).")] = None,
    store_images: Annotated[bool, typer.Option(help="Keep image bytes under --state-dir.")] = False,
    durable: Annotated[bool, typer.Option(help="fsync every state write.")] = False,
    connect_concurrency: Annotated[int, typer.Option(min=1, help="Connects in flight at once.")] = 64,
    http_connections: Annotated[int, typer.Option(min=1, help="Shared HTTP connection pool size.")] = 256,
    keepalive: Annotated[int, typer.Option(min=5, help="MQTT keepalive, seconds.")] = 60,
    duration: Annotated[float | None, typer.Option(help="Stop by itself after this many seconds.")] = None,
    shutdown_grace: Annotated[float, typer.Option(help="Seconds installs may take to finish on stop.")] = 5.0,
    status_interval: Annotated[float, typer.Option(help="Print a status line every N s (0: never).")] = 10.0,
    quiet: Annotated[bool, typer.Option(help="No progress bar or status lines.")] = False,
    tls_ca: Annotated[
        Path | None, typer.Option(help="mqtts:// broker: the CA certificate that signed the broker's")
    ] = None,
    tls_cert_dir: Annotated[
        Path | None, typer.Option(help="mutual TLS: per-device client certificates ID.crt and ID.key")
    ] = None,
    stats_file: Annotated[
        Path | None, typer.Option(help="At exit, write counters, installs and sent report seqs here (JSON).")
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            help="fleet (fleet's agent) or aws-jobs (the AWS IoT Jobs API through the unmodified awsiotsdk; "
            "register the devices first with protocol aws-jobs)"
        ),
    ] = "fleet",
    log_level: Annotated[str, typer.Option(help="Python log level.")] = "warning",
) -> None:
    """Connect N simulated devices and let them follow their desired documents until Ctrl-C/SIGTERM."""
    _setup_logging(log_level)
    try:
        config = FleetConfig(
            broker_url=broker,
            devices=devices,
            model=model,
            version=version,
            profile=profile,
            seed=seed,
            state_dir=state_dir,
            public_key=public_key,
            id_prefix=id_prefix,
            first_index=first_index,
            labels=_split_pairs(labels or []),
            password=password,
            password_secret=password_secret,
            fail_rates=_rates(fail_rate or []),
            params=_split_pairs(set_param or []),
            fetch=fetch,
            store_images=store_images,
            connect_concurrency=connect_concurrency,
            http_connections=http_connections,
            keepalive=keepalive,
            durable=durable,
            stats_file=stats_file,
            tls_ca=tls_ca,
            tls_cert_dir=tls_cert_dir,
            protocol=protocol,
        )
        if protocol not in ("fleet", "aws-jobs"):
            raise ValueError(f"--protocol must be fleet or aws-jobs, not {protocol!r}")
        config.resolved_profile()
        BrokerAddress.parse(broker)
        reserved = [d for d in config.ids()[:1] if is_reserved_device_id(d)]
        if reserved:
            raise ValueError(
                f"--id-prefix {id_prefix!r} gives reserved device ids ({reserved[0]!r}): names "
                "starting with fleet-, portal-, svc- or sys- belong to the orchestrator's own logins; "
                "choose another prefix"
            )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    code = asyncio.run(_run_fleet(config, duration, shutdown_grace, status_interval, quiet))
    raise typer.Exit(code)


async def _run_fleet(
    config: FleetConfig, duration: float | None, grace: float, status_interval: float, quiet: bool
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fleet = SimulatedFleet(config)
    progress = Progress(
        TextColumn("connecting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
        transient=True,
    )
    bar = progress.add_task("connect", total=config.devices)
    fleet.on_progress = lambda done, total: progress.update(bar, completed=done)
    t0 = time.perf_counter()
    with progress:
        await fleet.start(wait=False)
        connected = asyncio.create_task(fleet.wait_connected(None))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({connected, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not connected.done():
        connected.cancel()
        await fleet.stop()
        return 130
    stopping.cancel()
    took = time.perf_counter() - t0
    print(f"{READY_PREFIX} devices={config.devices} seconds={took:.2f}", flush=True)
    if not quiet:
        err.print(
            f"{config.devices} devices connected in {took:.2f}s ({config.devices / max(took, 1e-9):.0f}/s)"
        )
    deadline = loop.time() + duration if duration is not None else None
    while not stop.is_set():
        timeout = status_interval if status_interval > 0 and not quiet else None
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                break
            timeout = left if timeout is None else min(timeout, left)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout)
        if not quiet and status_interval > 0 and not stop.is_set():
            err.print(_status_line(fleet))
    if not quiet:
        err.print("stopping: publishing offline and disconnecting ...")
    await fleet.stop(grace)
    if config.stats_file is not None:
        config.stats_file.write_text(json.dumps(fleet.stats_document()))
    if not quiet:
        err.print(_summary(fleet))
    return 0


def _status_line(fleet: SimulatedFleet) -> str:
    s = fleet.stats
    finished = ", ".join(f"{k}={v}" for k, v in sorted(s.finished.items())) or "none"
    return f"connected={fleet.connected}/{len(fleet.agents)} reconnects={s.reconnects} finished: {finished}"


def _summary(fleet: SimulatedFleet) -> Table:
    table = Table(title="simulated fleet")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("devices", str(len(fleet.agents)))
    table.add_row("reconnects", str(fleet.stats.reconnects))
    for state, count in sorted(fleet.stats.reports.items()):
        table.add_row(f"reports {state}", str(count))
    versions: dict[str, int] = {}
    for version in fleet.versions().values():
        versions[version] = versions.get(version, 0) + 1
    for version, count in sorted(versions.items()):
        table.add_row(f"running {version}", str(count))
    return table


# ---------------------------------------------------------------- single agent
agent_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@agent_app.command()
def agent(
    device_id: Annotated[str, typer.Option(help="Device id (also MQTT client id and username).")],
    model: Annotated[str, typer.Option(help="Hardware model of this device.")],
    broker: Annotated[str, typer.Option(envvar="FLEET_MQTT_URL", help="mqtt://host:port")],
    state_dir: Annotated[Path, typer.Option(help="Where the agent keeps its state and images.")],
    public_key: Annotated[Path, typer.Option(help="Firmware-signing public key (PEM).")] = DEV_PUBLIC_KEY,
    version: Annotated[str, typer.Option(help="Version running on first start.")] = "1.0.0",
    password: Annotated[
        str | None, typer.Option(envvar="FLEET_DEVICE_PASSWORD", help="MQTT password.")
    ] = None,
    labels: Annotated[list[str] | None, typer.Option(help="k=v labels.")] = None,
    install_cmd: Annotated[
        str | None, typer.Option(help="Installer command; gets the image path ({image} or last arg).")
    ] = None,
    reboot_cmd: Annotated[str | None, typer.Option(help="Run after a successful install.")] = None,
    confirm_cmd: Annotated[str | None, typer.Option(help="Exit 0 when the new slot booted.")] = None,
    health_cmd: Annotated[
        str | None, typer.Option(help="Exit 0 while the application is healthy (soak).")
    ] = None,
    rollback_cmd: Annotated[
        str | None, typer.Option(help="Boot back into FLEET_TARGET_SLOT (the previous slot) on command.")
    ] = None,
    profile: Annotated[
        str, typer.Option(help="Simulated installer timings/faults when no --install-cmd.")
    ] = ("instant"),
    fetch: Annotated[str, typer.Option(help="http (default) or skip.")] = "http",
    keepalive: Annotated[int, typer.Option(min=5)] = 60,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run the update agent of one device until SIGINT/SIGTERM."""
    _setup_logging(log_level)
    installer: Installer
    if install_cmd:
        installer = CommandInstaller(
            install_cmd,
            reboot_cmd=reboot_cmd,
            confirm_cmd=confirm_cmd,
            health_cmd=health_cmd,
            rollback_cmd=rollback_cmd,
        )
    else:
        installer = SimulatedInstaller()
    try:
        prof = get_profile(profile).with_overrides(params={"fetch": fetch})
        ctx = AgentContext(
            broker=BrokerAddress.parse(broker, password),
            public_key=load_public_key(public_key),
            profile=prof,
            installer=installer,
            keepalive=keepalive,
            store_images=True,
        )
        store = JsonStateStore(state_dir, durable=True)
        device = DeviceAgent(device_id, model, version, ctx, labels=_split_pairs(labels or []), store=store)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    asyncio.run(_run_agent(device))


async def _run_agent(device: DeviceAgent) -> None:
    raise_nofile_limit()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(device.run())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not runner.done():
        await device.stop(grace=60.0)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(runner, 10.0)
    stopping.cancel()
    await device.ctx.aclose()


def agent_main() -> None:
    """Entry point of ``python -m device_sim.agent``."""
    agent_app()
