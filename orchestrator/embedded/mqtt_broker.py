"""Private MQTT brokers on free loopback ports: Mosquitto from PATH, else amqtt in a child process.

Both listen for MQTT over TCP and over WebSocket, keep no state on disk, and can enforce the
fleet's users and topic ACLs (:mod:`orchestrator.embedded.auth`). :func:`start_broker` picks one.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, TypedDict, Unpack
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from .auth import (
    BrokerKind,
    HashedUser,
    MqttUser,
    Role,
    hash_user,
    write_auth_files,
    write_mosquitto_listener_files,
)
from .ports import LOOPBACK, free_ports, port_is_open
from .process import ManagedProcess, ProcessStartError
from .redis_server import ServerNotFoundError, default_run_dir

log = logging.getLogger(__name__)

BrokerPreference = Literal["auto", "mosquitto", "amqtt"]
MIN_MOSQUITTO_VERSION = (2, 0)


@dataclass(frozen=True)
class TlsFiles:
    """A TLS listener for devices with client certificates: the CA that signed them, and the
    broker's own certificate and key."""

    cafile: Path
    certfile: Path
    keyfile: Path


class BrokerOptions(TypedDict, total=False):
    """Keyword arguments common to every embedded broker (see :class:`MqttBroker`)."""

    data_dir: Path | None
    tls: TlsFiles | None
    host: str
    port: int | None
    ws_port: int | None
    allow_anonymous: bool
    auth: bool
    users: Iterable[MqttUser]
    run_dir: Path | None
    startup_timeout: float
    die_with_parent: bool


class BrokerInfo(Protocol):
    """What tests and clients need to know to reach a broker, embedded or not."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def ws_port(self) -> int | None: ...
    @property
    def url(self) -> str: ...
    @property
    def ws_url(self) -> str | None: ...
    @property
    def kind(self) -> str: ...
    @property
    def supports_mqtt5(self) -> bool: ...


# ------------------------------------------------------------------ probing
def mqtt_connack(
    host: str,
    port: int,
    *,
    transport: Literal["tcp", "websockets"] = "tcp",
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 2.0,
    client_id: str | None = None,
) -> int | None:
    """Connect once with paho-mqtt and return the CONNACK reason code (0 = accepted).

    None if nothing answered with a CONNACK within ``timeout`` seconds (refused connection,
    closed socket, or a broker that rejects the protocol version by hanging up).
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"fleet-probe-{secrets.token_hex(4)}",
        protocol=protocol,
        transport=transport,
    )
    if username is not None:
        client.username_pw_set(username, password)
    codes: list[int] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        codes.append(int(getattr(reason, "value", reason)))  # type: ignore[call-overload]

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
        deadline = time.monotonic() + timeout
        while not codes and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        # A clean DISCONNECT: paho closes the socket once it has been sent.
        client.disconnect()
        for _ in range(10):
            if client.socket() is None or client.loop(timeout=0.02) != mqtt.MQTT_ERR_SUCCESS:
                break
    except (OSError, ValueError):
        pass
    # Any socket still open is closed when the client is collected (paho's __del__).
    del client
    return codes[0] if codes else None


def _wait_accepted(broker: MqttBroker, user: MqttUser, timeout: float) -> None:
    """Wait until ``user`` can log in where its role connects, with a client id its rule allows."""
    deadline = time.monotonic() + timeout
    port, transport, client_id = broker.port, "tcp", user.username
    if user.role == Role.SERVICE:
        port, client_id = broker.service_port, f"fleet-probe-{secrets.token_hex(4)}"
    elif user.role == Role.PORTAL:
        port, transport, client_id = broker.ws_port, "websockets", f"portal-probe-{secrets.token_hex(4)}"

    def accepted() -> bool:
        code = mqtt_connack(
            broker.host,
            port,
            transport=transport,  # type: ignore[arg-type]
            username=user.username,
            password=user.password,
            client_id=client_id,
        )
        return code == 0

    while not accepted():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"broker did not accept the new user {user.username!r} after reload")
        time.sleep(0.05)


# ------------------------------------------------------------------ external
@dataclass(frozen=True)
class ExternalBroker:
    """A broker run by someone else, known by its URL (``mqtt://[user[:password]@]host[:port]``)."""

    host: str
    port: int
    supports_mqtt5: bool = False
    username: str | None = None
    password: str | None = None
    kind: str = "external"
    ws_port: int | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str | None:
        return f"ws://{self.host}:{self.ws_port}/mqtt" if self.ws_port else None

    @classmethod
    def from_url(cls, url: str, *, probe: bool = True) -> ExternalBroker:
        """Parse ``url``; with ``probe`` check it answers and whether it accepts MQTT 5.

        Raises ValueError for an unsupported URL and ConnectionError if the probe gets no
        accepted connection.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ValueError(f"unsupported MQTT URL {url!r} (want mqtt://host:port)")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        host, port = parts.hostname, parts.port or 1883
        mqtt5 = False
        if probe:
            code = mqtt_connack(host, port, username=username, password=password)
            if code != 0:
                raise ConnectionError(f"MQTT broker at {host}:{port} refused a connection (CONNACK {code})")
            v5 = MQTTProtocolVersion.MQTTv5
            mqtt5 = mqtt_connack(host, port, protocol=v5, username=username, password=password) == 0
        return cls(host=host, port=port, supports_mqtt5=mqtt5, username=username, password=password)


# ------------------------------------------------------------------ embedded base
class MqttBroker(ABC):
    """A private broker in a child process. Use as a context manager or ``start()``/``stop()``.

    With ``auth=True`` (implied by a non-empty ``users``) the broker checks passwords and topic
    ACLs for ``users``; ``allow_anonymous`` then still admits clients without a username, but
    they get no topic at all. Without auth every client may do anything. ``port``/``ws_port``
    default to free loopback ports. ``run_dir`` holds the PID file and a private directory. With
    auth, Mosquitto serves each role on its own listener: devices on ``port``, the orchestrator's
    services on ``service_port`` (:attr:`service_url`), portal users on ``ws_port``; amqtt serves
    all on ``port`` (and WebSocket) and checks each role's client-id rule in its plugin.
    With ``data_dir`` (Mosquitto) retained messages and persistent sessions are kept there and
    survive :meth:`restart`, which brings the broker back on the same ports.
    """

    kind: BrokerKind
    supports_mqtt5: bool

    def __init__(
        self,
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        ws_port: int | None = None,
        allow_anonymous: bool = True,
        auth: bool = False,
        users: Iterable[MqttUser] = (),
        run_dir: Path | None = None,
        startup_timeout: float = 20.0,
        die_with_parent: bool = True,
        data_dir: Path | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.host = host
        self.data_dir = data_dir
        self.tls = tls
        self._fixed_ports = (port, ws_port)
        self.port: int = port or 0
        self._ws_port: int = ws_port or 0
        self._service_port: int = 0
        self.tls_port: int = 0
        self.allow_anonymous = allow_anonymous
        initial = list(users)
        self.auth = auth or bool(initial)
        self.run_dir = run_dir or default_run_dir()
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self._users: dict[str, HashedUser] = {}
        for user in initial:
            self._users[user.username] = hash_user(self.kind, user)
        self._process: ManagedProcess | None = None
        self._dir: Path | None = None

    # -- addresses
    @property
    def ws_port(self) -> int:
        """WebSocket listener port. Precondition: started (or given)."""
        return self._ws_port

    @property
    def url(self) -> str:
        """``mqtt://host:port``: where devices connect."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def service_port(self) -> int:
        """Where the orchestrator's services connect (the device port unless separate)."""
        return self._service_port or self.port

    @property
    def service_url(self) -> str:
        """``mqtt://host:service_port``: where the orchestrator's services connect."""
        return f"mqtt://{self.host}:{self.service_port}"

    @property
    def tls_url(self) -> str:
        """``mqtts://host:tls_port``: devices with client certificates. Precondition: started with ``tls``."""
        if not self.tls_port:
            raise RuntimeError("no TLS listener: start the broker with tls=TlsFiles(...)")
        return f"mqtts://{self.host}:{self.tls_port}"

    def _separate_service_listener(self) -> bool:
        return False

    @property
    def ws_url(self) -> str:
        """``ws://host:ws_port/mqtt`` (any path works on both brokers)."""
        return f"ws://{self.host}:{self._ws_port}/mqtt"

    @property
    def pid(self) -> int | None:
        """Broker pid while started."""
        return self._process.pid if self._process else None

    @property
    def usernames(self) -> list[str]:
        """Users currently configured (auth mode)."""
        return sorted(self._users)

    def is_running(self) -> bool:
        """True while the broker process runs."""
        return self._process is not None and self._process.is_running()

    def is_ready(self) -> bool:
        """True once the TCP listener answers an MQTT CONNECT with any CONNACK (a refusal
        counts: it proves the broker works) and the WebSocket listener accepts connections."""
        if not self.port or mqtt_connack(self.host, self.port, timeout=1.0) is None:
            return False
        if self._service_port and not port_is_open(self.host, self._service_port):
            return False
        return port_is_open(self.host, self._ws_port)

    # -- lifecycle
    def start(self) -> MqttBroker:
        """Start the broker and wait until it answers MQTT. Returns self.

        Retries with fresh ports when a picked one was taken meanwhile; raises
        :class:`ProcessStartError` if the broker does not come up.
        """
        if self.is_running():
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=f"{self.kind}-", dir=self.run_dir))
        fixed = all(self._fixed_ports)
        attempts = 1 if fixed else 3
        for attempt in range(attempts):
            picked = iter(free_ports(4, self.host))
            self.port = self._fixed_ports[0] or next(picked)
            self._ws_port = self._fixed_ports[1] or next(picked)
            if self._separate_service_listener():
                self._service_port = self._service_port or next(picked)
            if self.tls is not None and self.kind == "mosquitto":
                self.tls_port = self.tls_port or next(picked)
            if self.auth:
                self._write_auth()
            argv, marker = self._prepare(self._dir)
            self._process = ManagedProcess(
                argv,
                name=f"{self.kind}-{self.port}",
                pid_file=self.run_dir / f"{self._dir.name}.pid",
                log_file=self._dir / f"{self.kind}.log",
                marker=marker,
                env=self._env(),
                die_with_parent=self.die_with_parent,
                cleanup_dir=self._dir,
            )
            self._process.start()
            try:
                self._process.wait_ready(self.is_ready, self.startup_timeout, interval=0.1)
                return self
            except ProcessStartError:
                self._process.stop()
                if attempt == attempts - 1:
                    self._remove_dir()
                    raise
        raise AssertionError("unreachable")

    def restart(self) -> None:
        """Start the broker process again (after it died or was stopped) on the same ports, with the
        same users; with a ``data_dir`` its retained messages and sessions come back too."""
        if self._process is None or self._dir is None:
            raise RuntimeError("broker was never started")
        self._process.stop()
        self._fixed_ports = (self.port, self._ws_port)
        if self.auth:
            self._write_auth()
        self._process.start()
        self._process.wait_ready(self.is_ready, self.startup_timeout, interval=0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL) and remove its private directory. Idempotent."""
        if self._process is not None:
            self._process.stop(timeout)
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> MqttBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- users
    def add_users(self, users: Iterable[MqttUser], *, wait: bool = True) -> None:
        """Add or replace ``users`` and make a running broker reload its files.

        Precondition: the broker was created with auth. With ``wait`` this returns once the
        broker accepts the last added user's credentials.
        """
        if not self.auth:
            raise RuntimeError("broker was created without auth: pass auth=True or users=...")
        added = list(users)
        for user in added:
            self._users[user.username] = hash_user(self.kind, user)
        if self.is_running():
            self._write_auth()
            self.reload()
            if wait and added:
                _wait_accepted(self, added[-1], timeout=10.0)

    def remove_users(self, usernames: Iterable[str]) -> None:
        """Remove users and make a running broker reload. Open connections are not dropped."""
        for name in usernames:
            self._users.pop(name, None)
        if self.is_running() and self.auth:
            self._write_auth()
            self.reload()

    def reload(self) -> None:
        """Make the running broker re-read its password and ACL files (SIGHUP)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGHUP)

    def _auth_paths(self) -> tuple[Path, Path]:
        assert self._dir is not None
        return self._dir / "passwords", self._dir / "acl"

    def _write_auth(self) -> None:
        password_file, acl_file = self._auth_paths()
        write_auth_files(self.kind, self._users.values(), password_file, acl_file)
        if self._separate_service_listener():
            assert self._dir is not None
            write_mosquitto_listener_files(self._users.values(), self._dir)

    def _env(self) -> dict[str, str] | None:
        return None

    @abstractmethod
    def _prepare(self, workdir: Path) -> tuple[list[str], str]:
        """Write config files into ``workdir``; return (argv, command-line marker)."""


# ------------------------------------------------------------------ mosquitto
def mosquitto_version(executable: Path) -> tuple[int, int, int] | None:
    """Version printed by ``mosquitto -h``."""
    try:
        out = subprocess.run([str(executable), "-h"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"mosquitto version (\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def find_mosquitto() -> Path | None:
    """``$FLEET_MOSQUITTO``, else ``mosquitto`` on PATH or in /usr/sbin, /usr/local/sbin (2.0+ only)."""
    candidates = [os.environ.get("FLEET_MOSQUITTO"), shutil.which("mosquitto")]
    candidates += [str(Path(d) / "mosquitto") for d in ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")]
    for candidate in candidates:
        if not candidate or not os.access(candidate, os.X_OK):
            continue
        version = mosquitto_version(Path(candidate))
        if version is not None and version[:2] >= MIN_MOSQUITTO_VERSION:
            return Path(candidate)
    return None


class MosquittoBroker(MqttBroker):
    """Mosquitto (2.0 or later) with a TCP and a WebSocket listener; persistent with a ``data_dir``.

    ``extra_config`` lines are appended to the generated configuration file.
    """

    kind: BrokerKind = "mosquitto"
    supports_mqtt5 = True

    def __init__(
        self,
        *,
        executable: Path | None = None,
        extra_config: Sequence[str] = (),
        **kwargs: Unpack[BrokerOptions],
    ) -> None:
        found = executable or find_mosquitto()
        if found is None:
            raise ServerNotFoundError("no mosquitto >= 2.0 found (e.g. apt-get install mosquitto)")
        self.executable = found
        self.extra_config = list(extra_config)
        super().__init__(**kwargs)

    def _separate_service_listener(self) -> bool:
        return self.auth

    def _prepare(self, workdir: Path) -> tuple[list[str], str]:
        conf = workdir / "mosquitto.conf"
        lines = [
            "# Generated by fleet.",
            f"per_listener_settings {'true' if self.auth else 'false'}",
            # Run as root, mosquitto would switch to user 'mosquitto', who cannot read our files.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            # The ingest's persistent session must not lose reports while it catches up.
            "max_queued_messages 1000000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "connection_messages false",
            "set_tcp_nodelay true",
            # Device messages are small (ingest reads at most 8 KiB): a client sending a bigger
            # packet is disconnected by the broker before it costs anyone memory.
            "max_packet_size 65536",
        ]
        if self.data_dir is not None:
            # Retained desired documents, portal topics and queued reports survive a restart.
            self.data_dir.mkdir(parents=True, exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.data_dir}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        anonymous = f"allow_anonymous {'true' if self.allow_anonymous else 'false'}"
        if not self.auth:
            lines.append(anonymous)
            for port, protocol in ((self.port, "mqtt"), (self._ws_port, "websockets")):
                lines += [f"listener {port} {self.host}", f"protocol {protocol}", "max_connections -1"]
        else:
            listeners = (
                (self.port, "mqtt", Role.DEVICE),
                (self._service_port, "mqtt", Role.SERVICE),
                (self._ws_port, "websockets", Role.PORTAL),
            )
            for port, protocol, role in listeners:
                password_file, acl_file = workdir / f"passwords-{role.value}", workdir / f"acl-{role.value}"
                lines += [
                    f"listener {port} {self.host}",
                    f"protocol {protocol}",
                    "max_connections -1",
                    anonymous,
                ]
                lines += [f"password_file {password_file}", f"acl_file {acl_file}"]
                if role == Role.DEVICE:
                    # A device's client id is its username, whatever it sends: no takeover of another.
                    lines.append("use_username_as_clientid true")
            if self.tls is not None:
                # Devices with a client certificate: its common name is the MQTT user, and the client id.
                lines += [
                    f"listener {self.tls_port} {self.host}",
                    "protocol mqtt",
                    "max_connections -1",
                    "allow_anonymous false",
                    f"cafile {self.tls.cafile}",
                    f"certfile {self.tls.certfile}",
                    f"keyfile {self.tls.keyfile}",
                    "require_certificate true",
                    "use_identity_as_username true",
                    "use_username_as_clientid true",
                    f"acl_file {workdir / 'acl-device'}",
                ]
        lines += self.extra_config
        conf.write_text("\n".join(lines) + "\n")
        return [str(self.executable), "-c", str(conf)], str(conf)


# ------------------------------------------------------------------ amqtt
class AmqttBroker(MqttBroker):
    """amqtt in a child process (``python -m orchestrator.embedded.amqtt_runner``).

    Limits (amqtt 0.12): MQTT 3.1.1 only, far slower than Mosquitto, duplicate deliveries for
    overlapping subscriptions, last will only on abrupt disconnects, nothing kept on disk (a
    ``data_dir`` is ignored: a restart loses retained messages and sessions). Unlike amqtt's stock
    plugins, ours keep queued QoS 1 messages of persistent sessions with anonymous access on.
    """

    kind: BrokerKind = "amqtt"
    supports_mqtt5 = False

    def __init__(
        self, *, python: str | None = None, log_level: str = "WARNING", **kwargs: Unpack[BrokerOptions]
    ) -> None:
        self.python = python or sys.executable
        self.log_level = log_level
        super().__init__(**kwargs)

    def config(self) -> dict[str, object]:
        """The amqtt broker configuration for the current ports and auth settings."""
        plugins: dict[str, dict[str, object]] = {}
        if self.auth:
            password_file, acl_file = self._auth_paths()
            plugins["orchestrator.embedded.amqtt_plugins.PasswordFileAuthPlugin"] = {
                "password_file": str(password_file),
                "allow_anonymous": self.allow_anonymous,
                "acl_file": str(acl_file),
            }
            plugins["orchestrator.embedded.amqtt_plugins.TopicAclFilePlugin"] = {"acl_file": str(acl_file)}
        else:
            plugins["orchestrator.embedded.amqtt_plugins.PasswordFileAuthPlugin"] = {
                "allow_anonymous": self.allow_anonymous
            }
        return {
            "listeners": {
                # amqtt requires a listener named "default".
                "default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": -1},
                "ws": {"type": "ws", "bind": f"{self.host}:{self._ws_port}", "max_connections": -1},
            },
            "timeout_disconnect_delay": 0,
            # An explicit plugin map replaces amqtt's defaults ($SYS publisher, packet logger...).
            "plugins": plugins,
        }

    def _prepare(self, workdir: Path) -> tuple[list[str], str]:
        conf = workdir / "amqtt.json"
        conf.write_text(json.dumps(self.config(), indent=1))
        module = "orchestrator.embedded.amqtt_runner"
        argv = [self.python, "-m", module, "--config", str(conf), "--log-level", self.log_level]
        return argv, module

    def _env(self) -> dict[str, str]:
        # The child must import this package even when it is used from a source checkout.
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env


# ------------------------------------------------------------------ choice
def start_broker(prefer: BrokerPreference = "auto", **kwargs: Unpack[BrokerOptions]) -> MqttBroker:
    """Start and return a private broker.

    ``prefer="auto"`` uses Mosquitto when a 2.0+ binary is found and starts, else amqtt;
    ``"mosquitto"`` and ``"amqtt"`` insist on one (ServerNotFoundError / ProcessStartError).
    ``kwargs`` go to the broker's constructor (see :class:`MqttBroker`).
    """
    if prefer == "amqtt":
        return AmqttBroker(**kwargs).start()
    if prefer == "mosquitto":
        return MosquittoBroker(**kwargs).start()
    if find_mosquitto() is not None:
        try:
            return MosquittoBroker(**kwargs).start()
        except ProcessStartError as exc:
            log.warning("mosquitto did not start, falling back to amqtt: %s", exc)
    return AmqttBroker(**kwargs).start()
