"""A simulated fleet: N device agents in one asyncio process, each with its own MQTT connection.

Python API (used by tests and benchmarks)::

    config = FleetConfig(broker_url="mqtt://127.0.0.1:1883", devices=50, profile="instant")
    async with SimulatedFleet(config) as fleet:      # returns once every device is connected
        ...                                          # drive an orchestrator against it
    # from synchronous code:
    with SimulatedFleet(config).run_in_background() as handle:
        ...
    # as a separate process (prints "FLEET READY ..." once connected; SIGTERM stops it cleanly):
    proc = spawn_fleet(config)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_sim.agent import DeviceAgent
from device_sim.context import AgentContext, AgentStats, load_public_key
from device_sim.installer import Installer, SimulatedInstaller
from device_sim.mqtt_link import BrokerAddress
from device_sim.profiles import Profile, get_profile
from device_sim.state_store import JsonStateStore, MemoryStateStore, StateStore

if TYPE_CHECKING:
    from device_sim.aws_device import AwsJobsDevice

log = logging.getLogger(__name__)
T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEV_PUBLIC_KEY = REPO_ROOT / "firmware_samples" / "dev-signing-key.DEV-ONLY.pub.pem"
READY_PREFIX = "FLEET READY"
_SHARED_MEMORY_STORE = MemoryStateStore()


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (one socket per device); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise RLIMIT_NOFILE from %s to %s: %s", soft, target, exc)
        return soft
    return target


@dataclass
class FleetConfig:
    """What to simulate. Field names match the ``fleet sim`` options."""

    broker_url: str = "mqtt://127.0.0.1:1883"
    devices: int = 10
    model: str = "sensor-v2"
    version: str = "1.0.0"
    profile: str | Profile = "instant"
    seed: int = 0
    state_dir: Path | None = None  # None: state in memory only (restart = factory reset)
    public_key: Path | Ed25519PublicKey | None = None  # None: the dev key in firmware_samples/
    id_prefix: str = "sim-"
    first_index: int = 0
    device_ids: list[str] | None = None  # explicit ids instead of prefix + index
    labels: dict[str, str] = field(default_factory=dict)
    password: str | None = None
    password_secret: str | None = None  # per-device passwords: HMAC(secret, device id)
    fail_rates: dict[str, float] = field(default_factory=dict)  # e.g. {"install_error": 0.1}
    params: dict[str, str] = field(default_factory=dict)  # profile overrides, e.g. {"install_time": "1:3"}
    fetch: str | None = None  # override the profile's fetch mode ("http" or "skip")
    store_images: bool = False  # keep image bytes on disk (needs state_dir)
    connect_concurrency: int = 64
    http_connections: int = 256
    keepalive: int = 60
    durable: bool = False  # fsync every state write (a real device wants it; a simulator does not)
    installer: Installer | None = None  # default: a SimulatedInstaller driven by the profile
    stats_file: Path | None = None  # write counters, installs and every sent report's seq here at exit
    tls_ca: Path | None = None  # with an mqtts:// broker: the CA that signed the broker's certificate
    tls_cert_dir: Path | None = None  # per-device client certificates ID.crt / ID.key (mutual TLS)
    protocol: str = "fleet"  # or "aws-jobs": the devices speak the AWS IoT Jobs API through awsiotsdk

    def ids(self) -> list[str]:
        """The device ids, e.g. ``sim-00000`` .. ``sim-01999``."""
        if self.device_ids is not None:
            return list(self.device_ids)
        last = self.first_index + self.devices - 1
        width = max(5, len(str(last)))
        return [f"{self.id_prefix}{i:0{width}d}" for i in range(self.first_index, last + 1)]

    def resolved_profile(self) -> Profile:
        profile = get_profile(self.profile) if isinstance(self.profile, str) else self.profile
        params = dict(self.params)
        if self.fetch:
            params["fetch"] = self.fetch
        if self.fail_rates or params:
            profile = profile.with_overrides(self.fail_rates, params)
        return profile

    def to_argv(self) -> list[str]:
        """Command-line options reproducing this config (for ``python -m device_sim``)."""
        if self.installer is not None:
            raise ValueError("a custom installer cannot be passed to a subprocess")
        if not isinstance(self.profile, str):
            raise ValueError("pass a profile name (plus fail_rates/params) to run in a subprocess")
        argv = [
            "--devices", str(self.devices), "--model", self.model, "--version", self.version,
            "--profile", self.profile, "--broker", self.broker_url, "--seed", str(self.seed),
            "--id-prefix", self.id_prefix, "--first-index", str(self.first_index),
            "--connect-concurrency", str(self.connect_concurrency),
            "--http-connections", str(self.http_connections), "--keepalive", str(self.keepalive),
        ]  # fmt: skip
        if self.device_ids is not None:
            raise ValueError("explicit device_ids cannot be passed to a subprocess; use id_prefix")
        if self.state_dir is not None:
            argv += ["--state-dir", str(self.state_dir)]
        if isinstance(self.public_key, Path):
            argv += ["--public-key", str(self.public_key)]
        elif self.public_key is not None:
            raise ValueError("pass the public key as a PEM path to run in a subprocess")
        for key, value in self.labels.items():
            argv += ["--labels", f"{key}={value}"]
        if self.password is not None:
            argv += ["--password", self.password]
        if self.password_secret is not None:
            argv += ["--password-secret", self.password_secret]
        for key, rate in self.fail_rates.items():
            argv += ["--fail-rate", f"{key}={rate}"]
        for key, raw in self.params.items():
            argv += ["--set", f"{key}={raw}"]
        if self.fetch:
            argv += ["--fetch", self.fetch]
        if self.store_images:
            argv.append("--store-images")
        if self.durable:
            argv.append("--durable")
        if self.stats_file is not None:
            argv += ["--stats-file", str(self.stats_file)]
        if self.tls_ca is not None:
            argv += ["--tls-ca", str(self.tls_ca)]
        if self.tls_cert_dir is not None:
            argv += ["--tls-cert-dir", str(self.tls_cert_dir)]
        if self.protocol != "fleet":
            argv += ["--protocol", self.protocol]
        return argv


class SimulatedFleet:
    """N agents sharing one profile, one HTTP client and one installer."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.config = config
        self.profile = config.resolved_profile()
        self.on_progress = on_progress  # called with (connected, total) as devices connect
        self.installer: Installer = config.installer or SimulatedInstaller()
        self.stats = AgentStats()
        if config.stats_file is not None:
            self.stats.sent = {}
        self.agents: list[DeviceAgent] = []
        self.aws_devices: list[AwsJobsDevice] = []
        self._by_id: dict[str, DeviceAgent] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ctx: AgentContext | None = None
        self._all_connected: asyncio.Event | None = None
        self.connect_seconds: float | None = None
        self._t0 = 0.0

    # ------------------------------------------------------------ async API
    async def start(self, *, wait: bool = True, timeout: float | None = 120.0) -> None:
        """Create the agents and start connecting them (``connect_concurrency`` at a time).
        With ``wait``, return once every device is connected (TimeoutError after ``timeout``)."""
        if self._ctx is not None:
            raise RuntimeError("fleet already started")
        cfg = self.config
        ids = cfg.ids()
        limit = raise_nofile_limit()
        needed = len(ids) + cfg.http_connections + 64
        if limit < needed:
            log.warning(
                "RLIMIT_NOFILE is %d but %d devices need about %d descriptors", limit, len(ids), needed
            )
        self._all_connected = asyncio.Event()
        self._ctx = AgentContext(
            broker=BrokerAddress.parse(
                cfg.broker_url,
                cfg.password,
                cfg.password_secret,
                tls_ca=cfg.tls_ca,
                tls_cert_dir=cfg.tls_cert_dir,
            ),
            public_key=self._public_key(),
            profile=self.profile,
            installer=self.installer,
            seed=cfg.seed,
            keepalive=cfg.keepalive,
            store_images=cfg.store_images and cfg.state_dir is not None,
            connect_gate=asyncio.Semaphore(cfg.connect_concurrency),
            on_connect=self._on_connect,
            stats=self.stats,
            http_connections=cfg.http_connections,
            # With a private CA the firmware URL is HTTPS under that CA too.
            http_verify=str(cfg.tls_ca) if cfg.tls_ca is not None else True,
        )
        labels = dict(cfg.labels)  # one dict shared by every agent
        self._t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        if cfg.protocol == "aws-jobs":
            # The SDK (awscrt) is loaded only for AWS devices.
            from device_sim.aws_device import AwsJobsDevice

            for device_id in ids:
                device = AwsJobsDevice(device_id, cfg.model, cfg.version, self._ctx)
                self.aws_devices.append(device)
                self._tasks.append(loop.create_task(self._start_aws(device)))
            ids = []
        for device_id in ids:
            store: StateStore = _SHARED_MEMORY_STORE
            if cfg.state_dir is not None:
                store = JsonStateStore(cfg.state_dir / device_id, durable=cfg.durable)
            agent = DeviceAgent(device_id, cfg.model, cfg.version, self._ctx, labels=labels, store=store)
            self.agents.append(agent)
            self._by_id[device_id] = agent
            self._tasks.append(loop.create_task(agent.run()))
        if not ids and not self.aws_devices:
            self._all_connected.set()
        if wait:
            await self.wait_connected(timeout)

    async def wait_connected(self, timeout: float | None = 120.0) -> None:
        """Return once every device has connected at least once."""
        if self._all_connected is None:
            raise RuntimeError("fleet not started")
        await asyncio.wait_for(self._all_connected.wait(), timeout)

    async def stop(self, grace: float = 0.0) -> None:
        """Publish "offline" and disconnect every device. Installs in progress may finish within
        ``grace`` seconds; anything else in progress is abandoned (its state stays persisted)."""
        if self._ctx is None:
            return
        sem = asyncio.Semaphore(512)

        async def stop_one(agent: DeviceAgent) -> None:
            async with sem:
                with contextlib.suppress(Exception):
                    await agent.stop(grace)

        await asyncio.gather(*(stop_one(a) for a in self.agents))
        await asyncio.gather(*(d.stop() for d in self.aws_devices), return_exceptions=True)
        _done, pending = await asyncio.wait(self._tasks, timeout=10.0) if self._tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        await self._ctx.aclose()
        self._ctx = None
        self._tasks.clear()

    def kill(self) -> None:
        """Drop every connection abruptly (last wills fire), like a crashed simulator process."""
        for agent in self.agents:
            agent.kill()

    async def __aenter__(self) -> SimulatedFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ inspection
    def agent(self, device_id: str) -> DeviceAgent:
        return self._by_id[device_id]

    @property
    def device_ids(self) -> list[str]:
        return [a.device_id for a in self.agents]

    def versions(self) -> dict[str, str]:
        """Running version per device."""
        versions = {a.device_id: a.running_version for a in self.agents}
        versions.update({d.thing: d.running_version for d in self.aws_devices})
        return versions

    @property
    def connected(self) -> int:
        return sum(1 for a in self.agents if a.link.is_connected)

    async def wait_until(self, predicate: Callable[[SimulatedFleet], bool], timeout: float = 60.0) -> None:
        """Poll ``predicate(fleet)`` until true (TimeoutError after ``timeout`` seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            if loop.time() > deadline:
                raise TimeoutError("fleet condition not reached")
            await asyncio.sleep(0.05)

    def run_in_background(self, *, timeout: float = 120.0) -> BackgroundFleet:
        """Run this fleet in a thread with its own event loop (for synchronous callers)."""
        return BackgroundFleet(self, timeout=timeout)

    # ------------------------------------------------------------ internals
    def _public_key(self) -> Ed25519PublicKey:
        key = self.config.public_key
        if isinstance(key, Ed25519PublicKey):
            return key
        return load_public_key(key or DEV_PUBLIC_KEY)

    def stats_document(self) -> dict[str, Any]:
        """What the fleet did, device side: counters, installs per device, seqs of every sent report."""
        installs: dict[str, int] = {d.thing: d.installs for d in self.aws_devices if d.installs}
        if isinstance(self.installer, SimulatedInstaller):
            for (device_id, _update_id), count in self.installer.installs.items():
                installs[device_id] = installs.get(device_id, 0) + count
        return {
            "devices": len(self.agents) + len(self.aws_devices),
            "reports": dict(self.stats.reports),
            "finished": dict(self.stats.finished),
            "reconnects": self.stats.reconnects,
            "installs": installs,
            "sent": self.stats.sent or {},
            "versions": self.versions(),
        }

    async def _start_aws(self, device: AwsJobsDevice) -> None:
        assert self._ctx is not None and self._ctx.connect_gate is not None
        async with self._ctx.connect_gate:
            await device.start()
        self._on_connect(1)

    def _on_connect(self, count: int) -> None:
        self.stats.on_connect(count)
        if count != 1:
            return
        total = len(self.agents) + len(self.aws_devices) or self.config.devices
        if self.on_progress is not None:
            self.on_progress(self.stats.connected, total)
        if self.stats.connected >= total and self._all_connected is not None:
            if self.connect_seconds is None:
                self.connect_seconds = time.perf_counter() - self._t0
            self._all_connected.set()


class BackgroundFleet:
    """A SimulatedFleet running in a daemon thread. ``start()`` returns once all are connected."""

    def __init__(self, fleet: SimulatedFleet, *, timeout: float = 120.0) -> None:
        self.fleet = fleet
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self) -> BackgroundFleet:
        self._thread = threading.Thread(target=self._main, name="simulated-fleet", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._timeout + 5):
            raise TimeoutError("simulated fleet did not start")
        if self._error is not None:
            raise RuntimeError("simulated fleet failed to start") from self._error
        return self

    def call(self, fn: Callable[[SimulatedFleet], Coroutine[Any, Any, T]], timeout: float = 60.0) -> T:
        """Run ``fn(fleet)`` on the fleet's loop and return its result."""
        if self._loop is None:
            raise RuntimeError("not started")
        return asyncio.run_coroutine_threadsafe(fn(self.fleet), self._loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> BackgroundFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        asyncio.run(self._amain())

    async def _amain(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            await self.fleet.start(timeout=self._timeout)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            await self.fleet.stop()
            return
        self._ready.set()
        await self._stopped.wait()
        await self.fleet.stop()


def spawn_fleet(
    config: FleetConfig,
    *,
    ready_timeout: float = 120.0,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Start ``python -m device_sim`` for ``config`` and return once it printed its READY line.

    Stop it with ``proc.terminate()`` (SIGTERM: devices publish "offline" and disconnect) and
    ``proc.wait()``; ``proc.kill()`` simulates a crash (last wills fire).
    """
    argv = [sys.executable, "-m", "device_sim", *config.to_argv(), "--quiet", *(extra_args or [])]
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=child_env, cwd=REPO_ROOT)
    assert proc.stdout is not None
    result: list[str] = []

    def read_ready() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY_PREFIX):
                result.append(line)
                return

    reader = threading.Thread(target=read_ready, daemon=True)
    reader.start()
    reader.join(ready_timeout)
    if not result:
        proc.kill()
        proc.wait()
        raise TimeoutError(f"fleet subprocess not ready after {ready_timeout}s (exit code {proc.returncode})")
    # Keep draining stdout so the child never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
    return proc
