"""Runs fleet's own processes (Celery worker, beat, ingest, API) as children on one machine.

Given the URLs of Redis, the MQTT broker and the database, it starts each process with the
matching ``FLEET_*`` environment, waits until it is ready, and stops everything in reverse order.
Used by ``fleet demo``, the integration tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.embedded.ports import free_port
from orchestrator.embedded.process import ManagedProcess, ProcessStartError


@dataclass
class StackSettings:
    """Where the stack's services are and where it keeps its files."""

    data_dir: Path
    database_url: str
    redis_url: str
    mqtt_url: str
    mqtt5: bool = True  # the broker speaks MQTT 5 (Mosquitto): ingest uses it
    shared_subscriptions: bool = False  # ingest joins a $share group (for several ingest processes)
    api_port: int = 0
    # Ingest's shared-subscription group; a stack of its own on a shared broker needs its own group,
    # or members of another (stopped) stack's group would keep taking a share of its reports.
    share_group: str | None = None
    celery_broker_url: str | None = None  # Celery's transport if not redis_url (e.g. RabbitMQ)
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(
            FLEET_ENV="test" if os.environ.get("FLEET_ENV") != "production" else "production",
            FLEET_DATABASE_URL=self.database_url,
            FLEET_REDIS_URL=self.redis_url,
            FLEET_MQTT_URL=self.mqtt_url,
            FLEET_MQTT_V5="true" if self.mqtt5 else "false",
            # amqtt (the broker without MQTT 5 here) refuses client publishes to $aws/... topics
            FLEET_AWS_JOBS="true" if self.mqtt5 else "false",
            FLEET_MQTT_SHARED_SUBSCRIPTIONS="true" if self.shared_subscriptions and self.mqtt5 else "false",
            FLEET_API_PORT=str(self.api_port),
            FLEET_PUBLIC_BASE_URL=f"http://127.0.0.1:{self.api_port}",
            FLEET_FIRMWARE_DIR=str(self.data_dir / "firmware"),
            FLEET_DATA_DIR=str(self.data_dir),
            PYTHONUNBUFFERED="1",
        )
        if self.share_group:
            env["FLEET_INGEST_SHARE_GROUP"] = self.share_group
        if self.celery_broker_url:
            env["FLEET_CELERY_BROKER_URL"] = self.celery_broker_url
        env.update(self.extra_env)
        return env


class LocalStack:
    """The orchestrator's processes. Start what a test or command needs; ``stop()`` ends them all."""

    def __init__(self, settings: StackSettings) -> None:
        if not settings.api_port:
            settings.api_port = free_port()
        self.settings = settings
        self.processes: dict[str, ManagedProcess] = {}
        self.run_dir = settings.data_dir / "run"
        self.log_dir = settings.data_dir / "logs"
        self._counter = 0
        # Ingest client ids stay the same when a process is restarted, so its persistent session
        # (and the reports queued for it) is picked up again; unique per stack on a shared broker.
        self.stack_id = os.urandom(3).hex()
        if settings.share_group is None:
            settings.share_group = f"fleet-ingest-{self.stack_id}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    def _spawn(self, name: str, argv: list[str], marker: str) -> ManagedProcess:
        process = ManagedProcess(
            argv,
            name=name,
            pid_file=self.run_dir / f"{name}.pid",
            log_file=self.log_dir / f"{name}.log",
            marker=marker,
            env=self.settings.env(),
            cwd=Path.cwd(),
            die_with_parent=True,
        )
        process.start()
        self.processes[name] = process
        return process

    def start_worker(
        self, name: str | None = None, *, concurrency: int = 2, wait: bool = True
    ) -> ManagedProcess:
        """A Celery worker (prefork) consuming the default queue."""
        self._counter += 1
        name = name or f"worker{self._counter}"
        argv = [sys.executable, "-m", "celery", "-A", "orchestrator.worker", "worker", "--loglevel", "INFO"]
        argv += ["-c", str(concurrency), "-n", f"{name}@%h", "--without-gossip", "--without-mingle"]
        process = self._spawn(name, argv, marker="celery")
        if wait:
            broker = self.settings.celery_broker_url or self.settings.redis_url
            process.wait_ready(lambda: _worker_answers(broker, name), timeout=60, interval=0.3)
        return process

    def start_beat(self) -> ManagedProcess:
        schedule = self.settings.data_dir / "celerybeat-schedule"
        argv = [sys.executable, "-m", "celery", "-A", "orchestrator.worker", "beat", "--loglevel", "INFO"]
        argv += ["-s", str(schedule)]
        return self._spawn("beat", argv, marker="celery")

    def start_ingest(self, name: str = "ingest") -> ManagedProcess:
        """An ingest process; started again under the same name it resumes the same MQTT session."""
        argv = [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "ingest",
            "--client-id",
            f"fleet-{name}-{self.stack_id}",
        ]
        log_file = self.log_dir / f"{name}.log"
        offset = log_file.stat().st_size if log_file.exists() else 0
        process = self._spawn(name, argv, marker="orchestrator.cli")
        process.wait_ready(lambda: "subscribed to" in _read_from(log_file, offset), timeout=30)
        return process

    def start_api(self, attempts: int = 3) -> ManagedProcess:
        """The API on ``settings.api_port``; if another process took that port meanwhile, on a new one."""
        for attempt in range(attempts):
            argv = [sys.executable, "-m", "orchestrator.cli", "api", "--port", str(self.settings.api_port)]
            process = self._spawn("api", argv, marker="orchestrator.cli")
            try:
                process.wait_ready(lambda: _http_ok(f"{self.api_url}/healthz"), timeout=30, interval=0.1)
                return process
            except ProcessStartError as exc:
                process.stop()
                if "address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                self.settings.api_port = free_port()
        raise AssertionError("unreachable")

    def start_all(self, *, workers: int = 1, concurrency: int = 2, beat: bool = True) -> None:
        self.start_api()
        self.start_ingest()
        for _ in range(workers):
            self.start_worker(concurrency=concurrency)
        if beat:
            self.start_beat()

    def kill(self, name: str) -> None:
        """SIGKILL a process and all its children (a crash, not a shutdown)."""
        process = self.processes[name]
        if process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.stop(timeout=5)

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes[name].stop(timeout=15)
        self.processes.clear()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as stream:
            stream.seek(offset)
            return stream.read().decode(errors="replace")
    except OSError:
        return ""


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _worker_answers(broker_url: str, name: str) -> bool:
    """True once the named worker answers a control ping (it is consuming)."""
    from celery import Celery

    probe = Celery(broker=broker_url)
    try:
        replies = probe.control.ping(timeout=0.5)
    except Exception:
        return False
    finally:
        probe.close()
    return any(name in reply_name for reply in replies for reply_name in reply)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it returns truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


__all__ = ["LocalStack", "StackSettings", "wait_until"]
