"""``fleet up``: the whole orchestrator on one machine, supervised; optionally a simulated fleet.

Starts, on free loopback ports, a migrated SQLite database, a private Redis, an MQTT broker with
users and topic ACLs (a ``service`` user for the orchestrator's processes, a read-only ``portal``
user, one ``device`` user per simulated device with a password derived from a per-run secret),
then the API, ingest, a Celery worker and beat, and with ``--simulate N`` a simulated fleet. It
prints the URLs, an operator API token and the portal's MQTT credentials, and writes them to
``<data-dir>/stack.json`` (mode 0600).

A child that dies is restarted with backoff (never given up on: a crash loop is reported and
retried at most every 30 s). Redis (AOF) and Mosquitto keep their data in the data dir and come
back on the same ports, so killing either only slows a rollout down. The stack's secrets (download
token key, firmware signing key pair, Redis and broker passwords) are generated once per data dir
and kept there with mode 0600. Ctrl-C or SIGTERM stops everything in reverse order. ``--demo`` runs
a 3-wave rollout of the sample firmware over the simulated fleet.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from orchestrator.embedded import MqttUser, RedisServer, Role, cleanup_stale, start_broker
from orchestrator.embedded.mqtt_broker import BrokerPreference, MqttBroker
from orchestrator.embedded.process import ManagedProcess, process_alive, process_start_ticks
from orchestrator.embedded.stack_secrets import StackSecrets

if TYPE_CHECKING:
    from orchestrator.config import Settings
from orchestrator.local_stack import LocalStack, StackSettings
from orchestrator.supervisor import SupervisionError, Supervisor

console = Console()
SERVICE_USER = "service"
PORTAL_USER = "portal"
STACK_FILE = "stack.json"
# The API's conventional port, used when free so that URLs in docs and habits work.
PREFERRED_API_PORT = 8000
# Files and directories of a data dir that a fresh demo removes (nothing else is touched).
_RESETTABLE = (
    "fleet.db",
    "fleet.db-wal",
    "fleet.db-shm",
    "firmware",
    "logs",
    "celerybeat-schedule",
    "redis",
    "mqtt",
)


@dataclass
class UpOptions:
    """What ``fleet up`` should run (the command-line options)."""

    simulate: int = 0
    demo: bool = False
    exit_when_done: bool = False
    data_dir: Path = Path("var/up")
    profile: str = "realistic"
    waves: str = "10%,50%,100%"
    broker: BrokerPreference = "auto"
    workers: int = 1


def up(
    simulate: int = typer.Option(0, "--simulate", "-n", min=0, help="also run N simulated devices"),
    demo: bool = typer.Option(False, "--demo", help="roll the sample firmware out to the simulated devices"),
    exit_when_done: bool = typer.Option(
        False, "--exit-when-done", help="with --demo: stop everything once the rollout ended"
    ),
    data_dir: Path = typer.Option(
        None, help="database, logs, PID files and stack.json (default $FLEET_DATA_DIR/up, i.e. var/up)"
    ),
    profile: str = typer.Option("realistic", help="simulator profile: instant, realistic, flaky"),
    waves: str = typer.Option("10%,50%,100%", help="with --demo: wave sizes"),
    broker: str = typer.Option("auto", help="MQTT broker: auto (Mosquitto if installed), mosquitto, amqtt"),
    workers: int = typer.Option(1, min=1, help="Celery worker processes"),
) -> None:
    """Run the orchestrator on this machine (embedded Redis, MQTT broker, SQLite) until Ctrl-C."""
    if broker not in ("auto", "mosquitto", "amqtt"):
        raise typer.BadParameter("--broker must be auto, mosquitto or amqtt")
    if demo and simulate == 0:
        raise typer.BadParameter("--demo needs simulated devices: add --simulate N")
    if exit_when_done and not demo:
        raise typer.BadParameter("--exit-when-done only makes sense with --demo")
    from orchestrator.cli.stack_discovery import default_up_dir
    from orchestrator.config import get_settings

    options = UpOptions(
        simulate=simulate,
        demo=demo,
        exit_when_done=exit_when_done,
        data_dir=data_dir or default_up_dir(get_settings()),
        profile=profile,
        waves=waves,
        broker=broker,  # type: ignore[arg-type]
        workers=workers,
    )
    raise typer.Exit(run_up(options))


# ------------------------------------------------------------------ helpers
def _prepare_data_dir(options: UpOptions) -> Path:
    data_dir = options.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir.resolve()
    _refuse_if_running(data_dir)
    cleanup_stale(data_dir / "run")
    (data_dir / STACK_FILE).unlink(missing_ok=True)
    if options.demo:
        for name in _RESETTABLE:
            path = data_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return data_dir


def _refuse_if_running(data_dir: Path) -> None:
    try:
        info = json.loads((data_dir / STACK_FILE).read_text())
        pid, ticks = int(info["pid"]), info.get("pid_start_ticks")
    except (OSError, ValueError, KeyError, TypeError):
        return
    if pid != os.getpid() and process_alive(pid, ticks):
        raise typer.BadParameter(f"another `fleet up` (pid {pid}) is running on {data_dir}")


def _users(device_ids: list[str], keys: StackSecrets) -> tuple[MqttUser, MqttUser, list[MqttUser]]:
    from device_sim.mqtt_link import derive_device_password

    service = MqttUser(SERVICE_USER, keys.service_password, Role.SERVICE)
    portal = MqttUser(PORTAL_USER, keys.portal_password, Role.PORTAL)
    devices = [MqttUser(d, derive_device_password(keys.device_secret, d), Role.DEVICE) for d in device_ids]
    return service, portal, devices


def _private_files(data_dir: Path) -> None:
    """0700 for the data directory, 0600 for what an earlier, laxer run may have left readable."""
    data_dir.chmod(0o700)
    for path in data_dir.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(0o700 if path.is_dir() else path.stat().st_mode & 0o700)


def _operator_token(database_url: str) -> str:
    from orchestrator.db import session_scope
    from orchestrator.services import token_service

    with session_scope(database_url) as session:
        _token, secret = token_service.create_token(
            session, name="fleet up operator", role=token_service.Role.OPERATOR, actor="system:fleet-up"
        )
    return secret


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
    os.replace(tmp, path)


def _sim_process(
    options: UpOptions, data_dir: Path, broker_url: str, env: dict[str, str], public_key: Path
) -> ManagedProcess:
    from device_sim.fleet import FleetConfig
    from orchestrator.cli.demo_cmd import DEMO_SPEED

    config = FleetConfig(
        broker_url=broker_url,
        devices=options.simulate,
        model="sensor-v2",
        version="1.0.0",
        profile=options.profile,
        public_key=public_key,
    )
    if options.profile != "instant":
        # Real downloads and reboots, sped up so a rollout takes seconds, not minutes.
        config.params = dict(DEMO_SPEED)
    argv = [sys.executable, "-m", "device_sim", *config.to_argv(), "--quiet"]
    return ManagedProcess(
        argv,
        name="sim",
        pid_file=data_dir / "run" / "sim.pid",
        log_file=data_dir / "logs" / "sim.log",
        marker="device_sim",
        env=env,
        cwd=Path.cwd(),
        die_with_parent=True,
    )


class _Stop(Exception):
    """Raised by the signal handler while starting up."""


# ------------------------------------------------------------------ the run
def run_up(options: UpOptions) -> int:
    """Start everything, supervise until done or signalled, stop everything; the exit status."""
    from device_sim.fleet import READY_PREFIX, FleetConfig
    from orchestrator.config import Settings
    from orchestrator.db import upgrade_database
    from orchestrator.engine import client as engine_client

    stop = threading.Event()
    starting = True

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        if starting:
            raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Everything the stack writes (database, logs, keys, broker files) is the user's alone.
    os.umask(0o077)
    data_dir = _prepare_data_dir(options)
    run_dir, log_dir = data_dir / "run", data_dir / "logs"
    database_url = f"sqlite:///{data_dir / 'fleet.db'}"
    device_ids = FleetConfig(devices=options.simulate).ids()
    keys = StackSecrets.load_or_create(data_dir)
    service, portal, device_users = _users(device_ids, keys)
    # Never give up on a child: a crash loop backs off (up to 30 s) and is reported, the stack stays up.
    supervisor = Supervisor(
        max_restarts=None,
        max_backoff=30.0,
        on_event=lambda line: console.print(f"[yellow]supervisor:[/] {line}"),
    )
    redis_server: RedisServer | None = None
    broker: MqttBroker | None = None
    stack: LocalStack | None = None
    info: dict[str, Any] = {}
    code = 0
    try:
        with console.status("starting Redis and the MQTT broker…"):
            # Persistent, so that a restart of either costs seconds, not the stack's work in progress.
            redis_server = RedisServer(
                run_dir=run_dir, data_dir=data_dir / "redis", appendonly=True, password=keys.redis_password
            ).start()
            users = [service, portal, *device_users]
            broker = start_broker(
                options.broker,
                run_dir=run_dir,
                users=users,
                allow_anonymous=False,
                data_dir=data_dir / "mqtt",
            )
        supervisor.add("redis", _ServerChild(redis_server), stop=redis_server.stop)
        supervisor.add("broker", _ServerChild(broker), stop=broker.stop)
        upgrade_database(database_url)
        _private_files(data_dir)
        engine_client.use_settings(Settings(redis_url=redis_server.url, database_url=database_url))
        token = _operator_token(database_url)
        settings = StackSettings(
            data_dir=data_dir,
            database_url=database_url,
            redis_url=redis_server.url,
            mqtt_url=broker.service_url,
            mqtt5=broker.supports_mqtt5,
            extra_env={
                "FLEET_SECRET_KEY": keys.secret_key,
                "FLEET_SIGNING_KEY_PATH": str(keys.signing_key),
                "FLEET_PUBLIC_KEY_PATH": str(keys.public_key),
                "FLEET_MQTT_USERNAME": service.username,
                "FLEET_MQTT_PASSWORD": service.password,
                "FLEET_PORTAL_MQTT_WS_URL": broker.ws_url,
                "FLEET_PORTAL_MQTT_USERNAME": portal.username,
                "FLEET_PORTAL_MQTT_PASSWORD": portal.password,
            },
        )
        settings.api_port = PREFERRED_API_PORT if _port_free(PREFERRED_API_PORT) else 0
        stack = LocalStack(settings)
        with console.status("starting API, ingest, worker and beat…"):
            stack.start_all(workers=options.workers)
        for name, process in stack.processes.items():
            supervisor.add(name, process)
        if options.simulate:
            env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
            env.update(
                PYTHONUNBUFFERED="1",
                FLEET_DATA_DIR=str(data_dir),
                FLEET_DEVICE_PASSWORD_SECRET=keys.device_secret,
            )
            sim = _sim_process(options, data_dir, broker.url, env, keys.public_key)
            with console.status(f"connecting {options.simulate} simulated devices…"):
                sim.start()
                supervisor.add("sim", sim)
                sim.wait_ready(lambda: READY_PREFIX in sim.log_file.read_text(errors="replace"), timeout=120)
        info = {
            "pid": os.getpid(),
            "pid_start_ticks": process_start_ticks(os.getpid()),
            "data_dir": str(data_dir),
            "api_url": stack.api_url,
            "docs_url": f"{stack.api_url}/docs",
            "portal_url": f"{stack.api_url}/",
            "mqtt_url": broker.url,
            "mqtt_ws_url": broker.ws_url,
            "service_mqtt_url": broker.service_url,
            "broker": broker.kind,
            "redis_url": redis_server.url,
            "database_url": database_url,
            "operator_token": token,
            "portal_mqtt_username": portal.username,
            "portal_mqtt_password": portal.password,
            "service_mqtt_username": service.username,
            "service_mqtt_password": service.password,
            "simulated_devices": options.simulate,
            "log_dir": str(log_dir),
            "run_dir": str(run_dir),
            "processes": supervisor.pids(),
        }
        _write_private(data_dir / STACK_FILE, json.dumps(info, indent=2))
        _print_banner(info)
        starting = False
        if stop.is_set():
            raise _Stop("signal")
        demo_settings = Settings(
            database_url=database_url,
            firmware_dir=data_dir / "firmware",
            signing_key_path=keys.signing_key,
            public_key_path=keys.public_key,
            env="development",
        )
        code = _supervise(options, supervisor, stop, info, data_dir, demo_settings)
    except _Stop as exc:
        console.print(f"{exc}: stopping")
        code = 130
    except SupervisionError as exc:
        console.print(f"[red]{exc}[/]; stopping everything (logs in {log_dir})")
        code = 1
    except Exception as exc:
        console.print(f"[red]failed:[/] {exc}")
        code = 1
    finally:
        starting = False
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        with console.status("stopping…"):
            supervisor.stop_all()
            # Whatever started before the supervisor knew about it (a failed start-up).
            if stack is not None:
                stack.stop()
            if broker is not None:
                broker.stop()
            if redis_server is not None:
                redis_server.stop()
        (data_dir / STACK_FILE).unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.print("stopped")
    return code


class _ServerChild:
    """Adapts a Redis server or broker object to the supervisor: restarted on the same ports, with
    its persistent data (Redis AOF, Mosquitto's persistence file)."""

    def __init__(self, server: RedisServer | MqttBroker) -> None:
        self._server = server

    @property
    def pid(self) -> int | None:
        return self._server.pid

    @property
    def returncode(self) -> int | None:
        process = getattr(self._server, "_process", None)
        return process.returncode if process is not None else None

    def is_running(self) -> bool:
        return self._server.is_running()

    def start(self) -> None:
        self._server.restart()

    def stop(self, timeout: float = 5.0) -> None:
        self._server.stop(timeout)


def _print_banner(info: dict[str, Any]) -> None:
    console.print(f"[bold]API[/]          {info['api_url']}")
    console.print(f"[bold]API docs[/]     {info['docs_url']}")
    console.print(f"[bold]portal[/]       {info['portal_url']}")
    console.print(f"[bold]MQTT[/]         {info['mqtt_url']} ({info['broker']}; devices)")
    console.print(f"[bold]MQTT (WS)[/]    {info['mqtt_ws_url']}")
    console.print(f"[bold]operator token[/] {info['operator_token']}")
    console.print(
        f"[bold]portal MQTT login[/] {info['portal_mqtt_username']} / {info['portal_mqtt_password']}"
    )
    console.print(f"details in {info['data_dir']}/{STACK_FILE}; logs in {info['log_dir']}")
    fleet = _fleet_command()
    console.print(
        f"from another terminal in this directory, the CLI finds this stack: "
        f"[bold]{fleet} rollout list[/], [bold]{fleet} rollout watch 1[/]",
        highlight=False,
    )
    console.print("Ctrl-C stops everything")


def _fleet_command() -> str:
    """How the user can type the CLI: ``fleet`` if that is on PATH, else the path of this one."""
    here = Path(sys.argv[0]).resolve()
    on_path = shutil.which("fleet")
    if here.name == "fleet" and (on_path is None or Path(on_path).resolve() != here):
        try:
            return str(here.relative_to(Path.cwd()))
        except ValueError:
            return str(here)
    return "fleet"


def _supervise(
    options: UpOptions,
    supervisor: Supervisor,
    stop: threading.Event,
    info: dict[str, Any],
    data_dir: Path,
    demo_settings: Settings,
) -> int:
    """Watch the children until a signal (0), or with --exit-when-done the end of the demo."""
    demo_result: list[bool] = []
    demo_done = threading.Event()

    def run_demo() -> None:
        from orchestrator.cli.demo_cmd import run_demo as demo_rollout

        try:
            demo_result.append(demo_rollout(demo_settings, data_dir, options.simulate, options.waves))
        except BaseException as exc:  # the thread must always report back
            console.print(f"[red]demo failed:[/] {exc!r}")
            demo_result.append(False)
        finally:
            demo_done.set()

    if options.demo:
        threading.Thread(target=run_demo, name="demo", daemon=True).start()

    def restarted(_name: str) -> None:
        info["processes"] = supervisor.pids()
        _write_private(data_dir / STACK_FILE, json.dumps(info, indent=2))

    supervisor.on_restart = restarted
    announced = False
    while not stop.wait(0.25):
        supervisor.check()
        if demo_done.is_set():
            ok = bool(demo_result and demo_result[0])
            if options.exit_when_done:
                return 0 if ok else 1
            if not announced:
                console.print("the stack keeps running; Ctrl-C stops everything")
                announced = True
    console.print("signal received: stopping")
    if options.demo and demo_done.is_set() and not (demo_result and demo_result[0]):
        return 1
    return 0
