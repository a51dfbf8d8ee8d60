"""Rollout throughput of the whole stack on one machine, next to two references.

Starts a private Redis and a private Mosquitto on free loopback ports, then for each scenario a
fresh database (SQLite in a temporary directory, or a new database on the PostgreSQL server given
with --database-url), the API, one ingest, Celery worker(s) and beat, and a simulated fleet in a
subprocess. Scenarios (--scenario, default all):

  zero-delay     rollout to N devices (--devices, default 1000,10000) with the ``instant`` profile,
                 waves 1%,10%,100%, max_in_flight N: wall time, devices/s, CPU ms per device over
                 every process of the stack, peak RSS, Celery tasks per device, report -> portal
                 latency (own probe and the ingest's own figures)
  slow-download  N devices (--slow-devices, default 10000) in one wave, max_in_flight N, each busy for
                 a long time: by default 60 s in INSTALLING (no transfer: the simulator's shared HTTP
                 pool cannot drive thousands of downloads at once), or with --slow-fetch http a real
                 bandwidth-limited download from the API. Peak devices in flight, worker processes,
                 total RSS, time to complete (measured up to --slow-cap)
  naive          reference: one Celery task per device that blocks until the device is done
                 (benchmarks/naive_reference.py, its own worker), capped in devices and time
  raw-mqtt       reference: this process publishes the same desired documents straight to the
                 devices and waits for every SUCCEEDED report (no orchestration)
  realistic      fleet and the naive reference side by side on devices with the ``realistic``
                 profile (real HTTP downloads, seconds to install and reboot; --realistic-devices,
                 default 1000); the naive run stops after --naive-cap

Prints a table with the design targets and ratios, and writes benchmarks/results/rollout_throughput.json.
Everything it starts is stopped at the end; every wait is bounded by a timeout.

    python benchmarks/rollout_throughput.py [--quick] [--scenario zero-delay,raw-mqtt] [--devices 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks._bench_common import (  # noqa: E402
    PortalLatencyProbe,
    ProcessSampler,
    ReadOnlyMonitor,
    RoleUsage,
    ScratchDatabase,
    binary_version,
    machine_facts,
    median,
    mib,
    package_versions,
    rounded,
    self_cpu_s,
)
from benchmarks._profiles import ProfileSession, summarize  # noqa: E402
from device_sim.fleet import FleetConfig, spawn_fleet  # noqa: E402
from orchestrator.config import DEV_PUBLIC_KEY, Settings  # noqa: E402
from orchestrator.db import session_scope, upgrade_database  # noqa: E402
from orchestrator.embedded import (  # noqa: E402
    ManagedProcess,
    MosquittoBroker,
    RedisServer,
    cleanup_stale,
    find_mosquitto,
)
from orchestrator.engine import client as engine_client  # noqa: E402
from orchestrator.engine.celery_config import make_celery  # noqa: E402
from orchestrator.local_stack import LocalStack, StackSettings  # noqa: E402
from orchestrator.policy import RolloutPolicy, Target  # noqa: E402
from orchestrator.protocol import (  # noqa: E402
    REPORT_SUBSCRIPTION,
    Desired,
    FirmwareRef,
    Stage,
    desired_topic,
    info_topic,
    online_topic,
)
from orchestrator.services import rollout_service  # noqa: E402
from orchestrator.services.firmware_service import add_firmware  # noqa: E402
from orchestrator.services.rollout_planner import create_rollout  # noqa: E402

# Wide enough for the results table when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 200)
RESULTS = ROOT / "benchmarks" / "results" / "rollout_throughput.json"
SAMPLES = ROOT / "firmware_samples" / "sensor-v2"
MODEL, FROM_VERSION, TO_VERSION = "sensor-v2", "1.0.0", "1.1.0"
PACKAGES = ("celery", "kombu", "redis", "paho-mqtt", "aiomqtt", "sqlalchemy", "uvicorn", "fastapi")
SCENARIOS = ("zero-delay", "slow-download", "naive", "raw-mqtt", "realistic")
IN_FLIGHT = ("OFFERED", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "INSTALLING", "REBOOTING")
END_STATES = ("SUCCEEDED", "FAILED", "ROLLED_BACK", "TIMED_OUT", "SKIPPED", "CANCELED")
PORTAL_DEVICE_SUBSCRIPTION = "fleet/v1/portal/rollouts/+/devices/+"
TASK_LINE = re.compile(r"Task (\S+)\[[0-9a-f-]+\] (received|succeeded|ignored|retry|raised)")
TROUBLE = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|dropped|Dropping", re.IGNORECASE)

# Design section 9, printed next to the figures (tests never assert on times).
TARGETS: dict[str, dict[str, Any]] = {
    "zero_delay_10k_wall_s": {"limit": 60.0, "text": "10,000-device zero-delay rollout < 60 s wall"},
    "zero_delay_10k_cpu_ms_per_device": {"limit": 15.0, "text": "< 15 ms CPU per device, all processes"},
    "celery_tasks_per_device": {"limit": 3.0, "text": "about 2-3 Celery tasks per device"},
    "slow_download_worker_slots": {"limit": None, "text": "worker slots stay at the configured concurrency"},
    "slow_download_total_rss_mib": {"limit": 1536.0, "text": "10,000 in flight: total RSS < 1.5 GB"},
    "portal_latency_p50_ms": {"limit": 5.0, "text": "report -> portal p50 < 5 ms (at 1,000 reports/s)"},
    "portal_latency_p99_ms": {"limit": 50.0, "text": "report -> portal p99 < 50 ms (at 1,000 reports/s)"},
    "create_rollout_10k_s": {"limit": 1.0, "text": "create a 10,000-device rollout < 1 s"},
    # Performance goals set after the first release (zero-delay, same run).
    "fleet_vs_naive_1k": {"limit": None, "text": "1,000: as fast as naive, CPU <= naive + 50 %"},
    "zero_delay_10k_half_raw": {"limit": 0.5, "text": "10,000: >= 50 % of the raw MQTT speed"},
    "zero_delay_10k_cpu_8ms": {"limit": 8.0, "text": "10,000: <= 8 ms CPU/device (<= 5 w/o simulator)"},
    "stack_rss_10k_mib": {"limit": 400.0, "text": "10,000: peak RSS w/o simulator <= 400 MB"},
}


# ====================================================================== shared context
@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    run_dir: Path
    redis_server: RedisServer
    broker: MosquittoBroker
    broker_log: Path
    notes: list[str]

    @property
    def redis(self) -> redis.Redis[bytes]:
        return redis.Redis.from_url(self.redis_server.url)

    def flush_redis(self) -> None:
        client = self.redis
        try:
            client.flushall()
        finally:
            client.close()

    def broker_log_mark(self) -> int:
        return self.broker_log.stat().st_size if self.broker_log.exists() else 0

    def broker_trouble(self, mark: int) -> list[str]:
        return _trouble_lines(self.broker_log, mark)


def _is_local(url: str) -> bool:
    from sqlalchemy.engine import make_url

    return make_url(url).host in ("127.0.0.1", "localhost", "::1", None)


def _trouble_lines(path: Path, offset: int = 0, limit: int = 8) -> list[str]:
    """Lines since ``offset`` that look like errors or dropped messages (first ``limit``)."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    found = [line.strip() for line in text.splitlines() if TROUBLE.search(line)]
    if len(found) > limit:
        found = [*found[:limit], f"... {len(found) - limit} more"]
    return found


def _firmware_ref(url: str, token: str = "unused") -> FirmwareRef:
    manifest = json.loads((SAMPLES / f"{TO_VERSION}.json").read_text())
    return FirmwareRef(**manifest, url=url, token=token)


def _fleet_config(
    bench: Bench, devices: int, prefix: str, profile: str = "instant", **kwargs: Any
) -> FleetConfig:
    config = FleetConfig(
        broker_url=bench.broker.url,
        devices=devices,
        model=MODEL,
        version=FROM_VERSION,
        profile=profile,
        id_prefix=prefix,
        connect_concurrency=128,
        **kwargs,
    )
    config.public_key = DEV_PUBLIC_KEY
    return config


def _spawn_fleet(bench: Bench, config: FleetConfig, lifetime: float) -> subprocess.Popen[str]:
    with console.status(f"connecting {config.devices} simulated devices ..."):
        # --duration: the simulator stops by itself even if this process dies without cleaning up.
        return spawn_fleet(config, ready_timeout=300, extra_args=["--duration", str(int(lifetime))])


def _stop_fleet(bench: Bench, proc: subprocess.Popen[str] | None, ids: list[str]) -> None:
    """Stop the simulator, then remove the retained documents its devices left at the broker
    (info, online, desired), so the next scenario's ingest does not register them."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-cleaner")
    client.max_inflight_messages_set(1000)
    try:
        client.connect(bench.broker.host, bench.broker.port)
        client.loop_start()
        last = None
        for device_id in ids:
            for topic in (info_topic(device_id), online_topic(device_id), desired_topic(device_id)):
                last = client.publish(topic, b"", qos=1, retain=True)
        if last is not None:
            last.wait_for_publish(60)
    except (OSError, RuntimeError, ValueError) as exc:
        console.print(f"[yellow]could not clear retained documents: {exc}[/]")
    finally:
        client.disconnect()
        client.loop_stop()


def _usage_dict(usage: dict[str, RoleUsage]) -> dict[str, dict[str, float]]:
    return {
        role: {
            "cpu_s": round(u.cpu_s, 3),
            "peak_rss_mib": mib(u.peak_rss_bytes),
            "peak_process_rss_mib": mib(u.peak_process_rss_bytes),
            "max_processes": u.max_processes,
            **({"cpu_s_by_process": u.cpu_by_process} if len(u.cpu_by_process) > 1 else {}),
        }
        for role, u in usage.items()
    }


def _without_simulator(usage: dict[str, RoleUsage], devices: int) -> float | None:
    cpu = sum(u.cpu_s for role, u in usage.items() if role != "simulator")
    return round(1000 * cpu / devices, 2) if devices else None


def _outside_load(sampler: ProcessSampler, counted_cpu_s: float) -> dict[str, float]:
    """CPU the rest of the machine used during the window (other programs: noise in the figures)."""
    outside = max(0.0, sampler.machine_busy_s - counted_cpu_s)
    cpus = os.cpu_count() or 1
    return {
        "machine_busy_cpu_s": round(sampler.machine_busy_s, 2),
        "outside_cpu_s": round(outside, 2),
        "outside_share_of_machine": round(outside / max(sampler.wall_s * cpus, 1e-9), 3),
    }


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


# ====================================================================== orchestrated rollouts
_celery_apps: dict[str, Any] = {}


def _fleet_celery() -> Any:
    """A task-less Celery app on the stack's broker, for `inspect` calls."""
    settings = engine_client.current_settings()
    url = settings.redis_url
    if url not in _celery_apps:
        _celery_apps[url] = make_celery(settings)
    return _celery_apps[url]


def _worker_totals() -> Counter[str]:
    """Tasks accepted per task name, summed over the stack's workers (``celery inspect stats``)."""
    totals: Counter[str] = Counter()
    with contextlib.suppress(Exception):
        replies = _fleet_celery().control.inspect(timeout=2.0).stats() or {}
        for reply in replies.values():
            totals.update({k: int(v) for k, v in (reply.get("total") or {}).items()})
    return totals


def _log_task_counts(path: Path, offset: int) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter[str]] = {}
    with path.open("rb") as f:
        f.seek(offset)
        for raw in f:
            match = TASK_LINE.search(raw.decode(errors="replace"))
            if match:
                counts.setdefault(match[2], Counter())[match[1]] += 1
    return {outcome: dict(c) for outcome, c in counts.items()}


def _wait_drained(bench: Bench, deadline: float) -> float | None:
    """Wait until no Celery task is queued or reserved (kombu's ``unacked`` hash) twice in a row;
    returns the perf_counter time it happened, or None at ``deadline``."""
    client = bench.redis
    quiet = 0
    try:
        with console.status("waiting for the Celery queue to drain ..."):
            while time.perf_counter() < deadline:
                busy = int(client.llen("fleet")) + int(client.hlen("unacked"))
                quiet = quiet + 1 if busy == 0 else 0
                if quiet >= 2:
                    return time.perf_counter()
                time.sleep(0.25)
    finally:
        client.close()
    return None


def _ingest_stats(bench: Bench) -> dict[str, Any]:
    client = bench.redis
    try:
        raw = client.hgetall("fleet:ingest:stats")
    finally:
        client.close()
    stats = [json.loads(v) for v in raw.values()]
    if not stats:
        return {}
    counters = ("received", "applied", "batches", "steps_sent", "cas_retries")
    out: dict[str, Any] = {k: sum(int(one.get(k) or 0) for one in stats) for k in counters}
    # Several ingests: the slowest one's latency is what a portal user sees for its devices.
    for key in ("latency_p50_ms", "latency_p99_ms"):
        values = [one[key] for one in stats if one.get(key) is not None]
        out[key] = max(values) if values else None
    ignored: Counter[str] = Counter()
    for one in stats:
        ignored.update({k: int(v) for k, v in one.items() if k.startswith("ignored_")})
    out["ignored"] = dict(ignored)
    out["processes"] = len(stats)
    if out.get("received") and out.get("batches"):
        out["mean_batch"] = round(out["received"] / out["batches"], 1)
    return out


def run_rollout(
    bench: Bench,
    name: str,
    devices: int,
    *,
    waves: list[str | int],
    params: dict[str, str] | None = None,
    http_connections: int = 256,
    timeout: float,
    probe: bool = True,
    download_timeout_s: float = 600,
    profile: str = "instant",
) -> dict[str, Any]:
    """One rollout on a fresh stack; returns its figures."""
    args = bench.args
    bench.flush_redis()
    data_dir = bench.work / name
    data_dir.mkdir(parents=True)
    db = ScratchDatabase(args.database_url, data_dir, name.replace("-", "_"))
    url = db.create()
    result: dict[str, Any] = {"devices": devices, "database": db.kind, "completed": False}
    stack: LocalStack | None = None
    fleet: subprocess.Popen[str] | None = None
    monitor: ReadOnlyMonitor | None = None
    latency: PortalLatencyProbe | None = None
    sampler: ProcessSampler | None = None
    profiles: ProfileSession | None = None
    ids: list[str] = []
    broker_mark = bench.broker_log_mark()
    try:
        upgrade_database(url)
        settings = StackSettings(
            data_dir=data_dir,
            database_url=url,
            redis_url=bench.redis_server.url,
            mqtt_url=bench.broker.url,
            mqtt5=bench.broker.supports_mqtt5,
            # Several ingests split the report stream through one $share group.
            shared_subscriptions=args.ingests > 1,
        )
        stack = LocalStack(settings)
        with console.status(
            f"[{name}] starting API, {args.ingests} ingest(s), {args.workers} worker(s), beat ..."
        ):
            stack.start_api()
            for i in range(args.ingests):
                stack.start_ingest("ingest" if i == 0 else f"ingest-{i + 1}")
            for _ in range(args.workers):
                stack.start_worker(concurrency=args.concurrency)
            stack.start_beat()
        fw_settings = Settings(database_url=url, firmware_dir=data_dir / "firmware", env="development")
        manifest = json.loads((SAMPLES / f"{TO_VERSION}.json").read_text())
        with session_scope(url) as session, (SAMPLES / f"{TO_VERSION}.bin").open("rb") as stream:
            firmware_id = add_firmware(
                session, fw_settings, stream, model=MODEL, version=TO_VERSION, signature=manifest["signature"]
            ).id
        config = _fleet_config(
            bench, devices, f"{name}-", profile, params=dict(params or {}), http_connections=http_connections
        )
        ids = config.ids()
        fleet = _spawn_fleet(bench, config, lifetime=timeout + 600)
        monitor = ReadOnlyMonitor(url)
        deadline = time.monotonic() + 120 + devices / 100
        # The broker keeps retained info documents of earlier runs' devices: count only this fleet.
        count_sql = "SELECT count(*) FROM devices WHERE id LIKE :prefix"
        with console.status(f"[{name}] waiting for {devices} devices to register ..."):
            while (monitor.scalar(count_sql, prefix=f"{config.id_prefix}%") or 0) < devices:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"devices did not register; see {stack.log_dir / 'ingest.log'}")
                time.sleep(0.25)

        policy = RolloutPolicy(
            waves=waves,
            max_in_flight=devices,
            success_threshold=0.95,
            download_timeout_s=download_timeout_s,
            install_timeout_s=600,
        )
        t_create = time.perf_counter()
        with session_scope(url) as session:
            rollout = create_rollout(
                session,
                name=f"bench {name}",
                firmware_id=firmware_id,
                target=Target(device_ids=ids),
                policy=policy,
                actor="benchmark",
            )
            session.commit()
            rollout_id = rollout.id
        result["create_rollout_s"] = round(time.perf_counter() - t_create, 3)

        if probe:
            latency = PortalLatencyProbe(
                bench.broker.host,
                bench.broker.port,
                report_topic=REPORT_SUBSCRIPTION,
                portal_topic=PORTAL_DEVICE_SUBSCRIPTION,
            ).start()
        roles: dict[str, Callable[[], int | list[int] | None]] = {
            "redis": lambda: bench.redis_server.pid,
            "mosquitto": lambda: bench.broker.pid,
        }
        for proc_name, proc in stack.processes.items():
            roles[proc_name] = lambda proc=proc: proc.pid
        roles["simulator"] = lambda: fleet.pid if fleet is not None else None
        if db.kind == "postgresql" and _is_local(url):
            roles["postgresql (backends)"] = db.backend_pids
        worker_logs = {n: p.log_file for n, p in stack.processes.items() if n.startswith("worker")}
        log_offsets = {n: p.stat().st_size for n, p in worker_logs.items()}
        tasks_before = _worker_totals()
        sampler = ProcessSampler(roles, interval=0.5).start()
        own_cpu = self_cpu_s()
        if args.profile_seconds:
            profiles = ProfileSession(data_dir / "profiles", args.profile_seconds)
            for proc_name, proc in stack.processes.items():
                if proc.pid is not None and proc_name != "api":
                    profiles.attach(proc_name, proc.pid)
            if fleet is not None:
                profiles.attach("simulator", fleet.pid)

        t0 = time.perf_counter()
        with session_scope(url) as session:
            rollout_service.start_rollout(session, rollout_id, actor="benchmark")
        status, timeline = _watch(monitor, rollout_id, devices, name, t0, timeout)
        wall = time.perf_counter() - t0
        # The rollout may be COMPLETED (the reconciler closes a wave whose devices all ended) while
        # finalize steps are still queued: measure until the Celery queue is empty too.
        drained = _wait_drained(bench, time.perf_counter() + 120) if status == "COMPLETED" else None
        result["drained_after_s"] = round(drained - t0, 2) if drained is not None else None

        usage = sampler.stop()
        own_cpu = self_cpu_s() - own_cpu
        tasks_after = _worker_totals()
        if latency is not None:
            latency.stop()
        cpu_total = sum(u.cpu_s for u in usage.values())
        finished = timeline["final_counts"].get("SUCCEEDED", 0)
        tasks = {k: v - tasks_before.get(k, 0) for k, v in tasks_after.items() if v - tasks_before.get(k, 0)}
        task_total = sum(tasks.values())
        completed = status == "COMPLETED"
        basis, span = "rollout COMPLETED", wall
        if not completed and timeline["all_ended_s"]:
            basis, span = "all devices ended, rollout not COMPLETED", timeline["all_ended_s"]
        elif not completed:
            basis = "devices ended before the rollout was stopped"
        result.update(
            status=status,
            completed=completed,
            wall_s=round(wall, 2),
            devices_per_s=round(finished / span, 1) if span > 0 else None,
            devices_per_s_basis=basis,
            succeeded=finished,
            final_states=timeline["final_counts"],
            all_offered_after_s=timeline["all_offered_s"],
            all_devices_ended_after_s=timeline["all_ended_s"],
            peak_in_flight=timeline["peak_in_flight"],
            peak_in_flight_after_s=timeline["peak_in_flight_s"],
            cpu_s_total=round(cpu_total, 2),
            cpu_ms_per_device=round(1000 * cpu_total / finished, 2) if finished else None,
            cpu_ms_per_device_without_simulator=_without_simulator(usage, finished),
            cpu_by_role=_usage_dict(usage),
            peak_rss_total_mib=mib(sampler.peak_total_rss_bytes),
            peak_rss_without_simulator_mib=mib(sampler.peak_stack_rss_bytes),
            peak_pss_total_mib=mib(sampler.peak_total_pss_bytes),
            peak_pss_without_simulator_mib=mib(sampler.peak_stack_pss_bytes),
            worker_pool_processes=max(
                (u.max_processes - 1 for r, u in usage.items() if r.startswith("worker")), default=0
            ),
            benchmark_process_cpu_s=round(own_cpu, 2),
            outside_load=_outside_load(sampler, cpu_total + own_cpu),
            celery_tasks={
                "total": task_total,
                "per_device": round(task_total / finished, 2) if finished else None,
                "by_name": tasks,
                "from_worker_logs": {n: _log_task_counts(p, log_offsets[n]) for n, p in worker_logs.items()},
            },
            ingest=_ingest_stats(bench),
        )
        if latency is not None:
            result["portal_latency"] = latency.summary()
        if profiles is not None:
            result["profiles"] = {n: summarize(f) for n, f in profiles.stop().items()}
            result["profiles_note"] = (
                f"py-spy over the first {args.profile_seconds} s; figures of this run are perturbed"
            )
        trouble: dict[str, list[str]] = {}
        for proc_name, proc in stack.processes.items():
            if lines := _trouble_lines(proc.log_file):
                trouble[proc_name] = lines
        if lines := bench.broker_trouble(broker_mark):
            trouble["mosquitto"] = lines
        result["log_trouble"] = trouble
        result["logs"] = str(stack.log_dir)
        return result
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc(limit=6)
        if stack is not None:
            result["logs"] = str(stack.log_dir)
        return result
    finally:
        if sampler is not None and sampler.running:
            sampler.stop()
        if profiles is not None:
            profiles.stop(timeout=1)
        if latency is not None:
            with contextlib.suppress(Exception):
                latency.stop()
        _stop_fleet(bench, fleet, ids)
        if stack is not None:
            with console.status(f"[{name}] stopping the stack ..."):
                stack.stop()
        if monitor is not None:
            monitor.close()
        db.drop()


def _watch(
    monitor: ReadOnlyMonitor, rollout_id: int, devices: int, name: str, t0: float, timeout: float
) -> tuple[str, dict[str, Any]]:
    """Poll SQL until the rollout ends or ``timeout`` passes; track devices in flight."""
    status = "RUNNING"
    peak, peak_at, all_offered, all_ended = 0, None, None, None
    counts: dict[str, int] = {}
    next_line = 15.0  # without a terminal, a status line every 15 s instead of the live bar
    with _progress() as progress:
        bar = progress.add_task(f"[{name}] rollout", total=devices, info="")
        while True:
            elapsed = time.perf_counter() - t0
            counts = {
                str(s): int(n)
                for s, n in monitor.rows(
                    "SELECT state, count(*) FROM device_updates WHERE rollout_id = :r GROUP BY state",
                    r=rollout_id,
                )
            }
            status = str(monitor.scalar("SELECT status FROM rollouts WHERE id = :r", r=rollout_id))
            in_flight = sum(counts.get(s, 0) for s in IN_FLIGHT)
            if in_flight > peak:
                peak, peak_at = in_flight, round(elapsed, 1)
            if all_offered is None and not counts.get("PENDING") and not counts.get("QUEUED"):
                all_offered = round(elapsed, 2)
            done = sum(counts.get(s, 0) for s in END_STATES)
            if all_ended is None and done >= devices:
                all_ended = round(elapsed, 2)
            progress.update(bar, completed=done, info=f"in flight {in_flight:>5}  {status}")
            if not console.is_terminal and elapsed >= next_line:
                next_line += 15.0
                console.print(f"  {elapsed:6.0f} s  ended {done}/{devices}  in flight {in_flight}  {status}")
            if status in ("COMPLETED", "HALTED", "ABORTED") or elapsed > timeout:
                break
            time.sleep(0.25)
    if status not in ("COMPLETED", "HALTED", "ABORTED"):
        status = f"TIMEOUT after {timeout:.0f}s ({status})"
        console.print(f"[red][{name}] rollout did not end within {timeout:.0f}s: {counts}[/]")
    return status, {
        "final_counts": counts,
        "peak_in_flight": peak,
        "peak_in_flight_s": peak_at,
        "all_offered_s": all_offered,
        "all_ended_s": all_ended,
    }


# ====================================================================== naive reference
def run_naive(bench: Bench, devices: int, cap_s: float, profile: str = "instant") -> dict[str, Any]:
    from benchmarks import naive_reference as naive

    args = bench.args
    bench.flush_redis()
    naive.app.conf.broker_url = bench.redis_server.url
    data_dir = bench.work / f"naive-{profile}-{devices}"
    result: dict[str, Any] = {"devices": devices, "profile": profile, "time_cap_s": cap_s, "completed": False}
    fleet: subprocess.Popen[str] | None = None
    worker: ManagedProcess | None = None
    sampler: ProcessSampler | None = None
    files: _FirmwareFiles | None = None
    config = _fleet_config(bench, devices, f"naive{profile[0]}-", profile)
    ids = config.ids()
    try:
        if config.resolved_profile().fetch == "http":
            # The naive pattern has no API: its devices fetch the image from a plain file server.
            files = _FirmwareFiles().start()
        fleet = _spawn_fleet(bench, config, lifetime=cap_s + 600)
        env = dict(os.environ)
        env.update(
            NAIVE_REDIS_URL=bench.redis_server.url,
            NAIVE_MQTT_URL=bench.broker.url,
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
            PYTHONUNBUFFERED="1",
        )
        argv = [sys.executable, "-m", "celery", "-A", "benchmarks.naive_reference", "worker"]
        argv += ["-Q", naive.QUEUE, "-c", str(args.concurrency), "-n", "naive@%h", "--loglevel", "INFO"]
        argv += ["--without-gossip", "--without-mingle", "-E"]
        worker = ManagedProcess(
            argv,
            name="naive-worker",
            pid_file=bench.run_dir / "naive-worker.pid",
            log_file=data_dir / "logs" / "naive-worker.log",
            marker="celery",
            env=env,
            cwd=ROOT,
        )
        worker.start()
        worker.wait_ready(lambda: _naive_ready(naive.app), timeout=60, interval=0.3)

        ref = _firmware_ref(files.url if files else "http://127.0.0.1:9/unused")
        download = Desired(update_id=1, attempt=1, stage=Stage.DOWNLOAD, firmware=ref).to_payload().decode()
        install = Desired(update_id=1, attempt=1, stage=Stage.INSTALL, firmware=ref).to_payload().decode()
        roles: dict[str, Callable[[], int | list[int] | None]] = {
            "redis": lambda: bench.redis_server.pid,
            "mosquitto": lambda: bench.broker.pid,
            "naive-worker": lambda: worker.pid if worker is not None else None,
            "simulator": lambda: fleet.pid if fleet is not None else None,
        }
        client = bench.redis
        sampler = ProcessSampler(roles, interval=0.5).start()
        own_cpu = self_cpu_s()
        t0 = time.perf_counter()
        with naive.app.producer_or_acquire() as producer:
            for device_id in ids:
                naive.update_device.apply_async(
                    (device_id, download, install, 60.0), queue=naive.QUEUE, producer=producer
                )
        capped = False
        with _progress() as progress:
            bar = progress.add_task("[naive] one blocking task per device", total=devices, info="")
            while True:
                done = int(client.get(naive.DONE_KEY) or 0)
                elapsed = time.perf_counter() - t0
                progress.update(bar, completed=done, info=f"{done / max(elapsed, 1e-9):.0f}/s")
                if done >= devices:
                    break
                if elapsed > cap_s:
                    capped = True
                    client.delete(naive.QUEUE)  # drop the tasks not yet taken
                    break
                time.sleep(0.2)
        wall = time.perf_counter() - t0
        done_at_cap = int(client.get(naive.DONE_KEY) or 0)
        usage = sampler.stop()
        own_cpu = self_cpu_s() - own_cpu
        if capped:
            # The tasks already running finish within their own timeout.
            settle = time.monotonic() + 70
            while time.monotonic() < settle and int(client.get(naive.DONE_KEY) or 0) < done_at_cap + 2:
                time.sleep(0.2)
        states = {k.decode(): int(v) for k, v in client.hgetall(naive.STATES_KEY).items()}
        client.close()
        cpu_total = sum(u.cpu_s for u in usage.values())
        rate = done_at_cap / wall if wall > 0 else 0.0
        result.update(
            completed=not capped,
            capped=capped,
            wall_s=round(wall, 2),
            finished=done_at_cap,
            devices_per_s=round(rate, 1),
            extrapolated_wall_s=round(devices / rate, 1) if capped and rate else None,
            cpu_s_total=round(cpu_total, 2),
            cpu_ms_per_device=round(1000 * cpu_total / max(done_at_cap, 1), 2),
            cpu_ms_per_device_without_simulator=_without_simulator(usage, done_at_cap),
            cpu_by_role=_usage_dict(usage),
            peak_rss_total_mib=mib(sampler.peak_total_rss_bytes),
            outside_load=_outside_load(sampler, cpu_total + own_cpu),
            final_states=states,
            celery_tasks_per_device=1,
        )
        if lines := _trouble_lines(worker.log_file):
            result["log_trouble"] = {"naive-worker": lines}
        return result
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc(limit=6)
        return result
    finally:
        if sampler is not None and sampler.running:
            sampler.stop()
        if worker is not None:
            worker.stop(timeout=15)
        _stop_fleet(bench, fleet, ids)
        if files is not None:
            files.stop()


class _FirmwareFiles:
    """The sample image over plain HTTP on a free loopback port (Range requests are not needed:
    the naive reference's devices are never cut off mid-download)."""

    def __init__(self) -> None:
        import functools
        import http.server
        import threading

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        handler = functools.partial(Quiet, directory=str(SAMPLES))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{TO_VERSION}.bin"

    def start(self) -> _FirmwareFiles:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _naive_ready(app: Any) -> bool:
    try:
        replies = app.control.ping(timeout=0.5)
    except Exception:
        return False
    return any("naive@" in name for reply in replies for name in reply)


# ====================================================================== raw MQTT reference
def run_raw(bench: Bench, devices: int, timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {"devices": devices, "completed": False}
    fleet: subprocess.Popen[str] | None = None
    sampler: ProcessSampler | None = None
    config = _fleet_config(bench, devices, "raw-")
    try:
        fleet = _spawn_fleet(bench, config, lifetime=timeout + 600)
        roles: dict[str, Callable[[], int | list[int] | None]] = {
            "mosquitto": lambda: bench.broker.pid,
            "simulator": lambda: fleet.pid if fleet is not None else None,
        }
        sampler = ProcessSampler(roles, interval=0.5).start()
        own_cpu = self_cpu_s()
        outcome = asyncio.run(_raw_round(bench, config.ids(), timeout))
        own_cpu = self_cpu_s() - own_cpu
        usage = sampler.stop()
        # This process is the orchestrator here (its sampler thread included: a few ms per second).
        usage["benchmark process (publisher)"] = RoleUsage(cpu_s=own_cpu)
        cpu_total = sum(u.cpu_s for u in usage.values())
        finished = outcome["states"].get("SUCCEEDED", 0)
        wall = outcome["wall_s"]
        result.update(
            completed=finished == devices,
            wall_s=round(wall, 2),
            devices_per_s=round(finished / wall, 1) if wall > 0 else None,
            succeeded=finished,
            final_states=outcome["states"],
            reports=outcome["reports"],
            cpu_s_total=round(cpu_total, 2),
            cpu_ms_per_device=round(1000 * cpu_total / max(finished, 1), 2),
            cpu_ms_per_device_without_simulator=_without_simulator(usage, finished),
            cpu_by_role=_usage_dict(usage),
            outside_load=_outside_load(sampler, cpu_total),
        )
        return result
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc(limit=6)
        return result
    finally:
        if sampler is not None and sampler.running:
            sampler.stop()
        _stop_fleet(bench, fleet, config.ids())


async def _raw_round(bench: Bench, ids: list[str], timeout: float) -> dict[str, Any]:
    """Download stage to every device, install stage on VERIFIED, until every device ended."""
    import aiomqtt

    ref = _firmware_ref("http://127.0.0.1:9/unused")
    download = Desired(update_id=1, attempt=1, stage=Stage.DOWNLOAD, firmware=ref).to_payload()
    install = Desired(update_id=1, attempt=1, stage=Stage.INSTALL, firmware=ref).to_payload()
    wanted = set(ids)
    ended: dict[str, str] = {}
    verified: set[str] = set()
    reports = 0
    pending: set[asyncio.Task[None]] = set()
    quiet = logging.getLogger("bench.raw-mqtt")
    quiet.setLevel(logging.ERROR)  # aiomqtt warns about every publish beyond ten in flight
    async with aiomqtt.Client(
        bench.broker.host,
        bench.broker.port,
        identifier="bench-raw-orchestrator",
        max_inflight_messages=1000,
        logger=quiet,
    ) as client:
        # QoS 0: Mosquitto never drops QoS 0 messages for a connected subscriber.
        await client.subscribe(REPORT_SUBSCRIPTION, qos=0)

        async def publish_all() -> None:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                await asyncio.gather(
                    *(client.publish(desired_topic(d), download, qos=1, retain=True) for d in chunk)
                )

        async def publish_install(device_id: str) -> None:
            await client.publish(desired_topic(device_id), install, qos=1, retain=True)

        t0 = time.perf_counter()
        first = asyncio.create_task(publish_all())
        with _progress() as progress:
            bar = progress.add_task("[raw-mqtt] desired documents only", total=len(ids), info="")
            try:
                async with asyncio.timeout(timeout):
                    async for message in client.messages:
                        device_id = message.topic.value.split("/")[3]
                        payload = message.payload
                        if device_id not in wanted or not isinstance(payload, bytes | bytearray):
                            continue
                        reports += 1
                        state = json.loads(payload)["state"]
                        if state == "VERIFIED" and device_id not in verified:
                            verified.add(device_id)
                            task = asyncio.create_task(publish_install(device_id))
                            pending.add(task)
                            task.add_done_callback(pending.discard)
                        elif state in END_STATES and device_id not in ended:
                            ended[device_id] = state
                            if len(ended) % 100 == 0 or len(ended) == len(ids):
                                progress.update(bar, completed=len(ended))
                            if len(ended) == len(ids):
                                break
            except TimeoutError:
                console.print(f"[red][raw-mqtt] only {len(ended)} of {len(ids)} devices ended in time[/]")
        wall = time.perf_counter() - t0
        await first
        if pending:
            await asyncio.wait(pending, timeout=10)
        # Remove the retained documents (not timed).
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            await asyncio.gather(*(client.publish(desired_topic(d), b"", qos=1, retain=True) for d in chunk))
    return {"wall_s": wall, "states": dict(Counter(ended.values())), "reports": reports}


# ====================================================================== orchestration of the run
def _median_of(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    return {k: rounded(median(r.get(k) for r in ok), 2) for k in keys}


MEDIAN_KEYS = (
    "wall_s",
    "devices_per_s",
    "cpu_ms_per_device",
    "cpu_ms_per_device_without_simulator",
    "peak_rss_total_mib",
    "peak_rss_without_simulator_mib",
    "create_rollout_s",
    "all_devices_ended_after_s",
    "peak_pss_without_simulator_mib",
)


def run_all(bench: Bench) -> dict[str, Any]:
    args = bench.args
    out: dict[str, Any] = {}
    if "zero-delay" in args.scenarios:
        out["zero_delay"] = []
        for n in args.sizes:
            runs = []
            for i in range(args.repeat):
                console.rule(f"zero-delay rollout, {n} devices (run {i + 1}/{args.repeat})")
                run = run_rollout(
                    bench, f"zd{n}-{i}", n, waves=["1%", "10%", "100%"], timeout=args.timeout(n)
                )
                _print_run(run)
                runs.append(run)
            out["zero_delay"].append({"devices": n, "runs": runs, "median": _zero_delay_median(runs)})
    if "slow-download" in args.scenarios:
        n = args.slow_devices
        console.rule(f"slow downloads, {n} devices in one wave")
        params = {"progress_step": "25"}
        if args.slow_fetch == "http":
            params.update(fetch="http", bandwidth=str(args.slow_bandwidth))
            expected = 200_003 / args.slow_bandwidth
        else:
            params.update(fetch="skip", install_time=str(args.slow_seconds))
            expected = args.slow_seconds
            bench.notes.append(
                f"slow-download ran with --slow-fetch skip: no HTTP transfer; each device stays "
                f"{args.slow_seconds:.0f} s in INSTALLING instead (the simulator's shared HTTP pool "
                "cannot drive thousands of concurrent downloads; use --slow-fetch http for real ones)"
            )
            console.print(f"[yellow]{bench.notes[-1]}[/]")
        run = run_rollout(
            bench,
            f"slow{n}",
            n,
            waves=["100%"],
            params=params,
            http_connections=args.slow_http_connections,
            timeout=args.slow_cap,
            probe=False,
            download_timeout_s=max(600, 10 * expected),
        )
        run["profile"] = {
            "fetch": args.slow_fetch,
            "bandwidth_bytes_per_s": args.slow_bandwidth if args.slow_fetch == "http" else None,
            "simulator_http_connections": args.slow_http_connections if args.slow_fetch == "http" else None,
            "install_time_s": args.slow_seconds if args.slow_fetch == "skip" else None,
            "firmware_bytes": 200_003,
            "seconds_per_device_transfer": round(expected, 1),
        }
        run["configured_concurrency"] = args.concurrency * args.workers
        _print_run(run)
        out["slow_download"] = run
    if "naive" in args.scenarios:
        n = min(args.naive_devices, max(args.sizes))
        console.rule(f"naive reference: one blocking Celery task per device, {n} devices")
        run = run_naive(bench, n, args.naive_cap)
        _print_run(run)
        out["naive"] = run
    if "raw-mqtt" in args.scenarios:
        out["raw_mqtt"] = []
        for n in args.sizes:
            runs = []
            for i in range(args.repeat):
                console.rule(f"raw MQTT round trip, {n} devices (run {i + 1}/{args.repeat})")
                run = run_raw(bench, n, timeout=args.timeout(n))
                _print_run(run)
                runs.append(run)
            out["raw_mqtt"].append({"devices": n, "runs": runs, "median": _median_of(runs, MEDIAN_KEYS[:4])})
    if "realistic" in args.scenarios:
        n = args.realistic_devices
        console.rule(f"realistic profile, {n} devices: fleet")
        fleet_run = run_rollout(
            bench,
            f"real{n}",
            n,
            waves=["1%", "10%", "100%"],
            profile="realistic",
            timeout=args.realistic_timeout,
        )
        _print_run(fleet_run)
        console.rule(f"realistic profile, {n} devices: naive reference (stops after {args.naive_cap:.0f} s)")
        naive_run = run_naive(bench, n, args.naive_cap, profile="realistic")
        _print_run(naive_run)
        out["realistic"] = {"fleet": fleet_run, "naive": naive_run}
    return out


def _zero_delay_median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = _median_of(runs, MEDIAN_KEYS)
    ok = [r for r in runs if "error" not in r]
    med["celery_tasks_per_device"] = rounded(median(r["celery_tasks"]["per_device"] for r in ok))
    med["portal_p50_ms"] = rounded(median((r.get("portal_latency") or {}).get("p50_ms") for r in ok))
    med["portal_p99_ms"] = rounded(median((r.get("portal_latency") or {}).get("p99_ms") for r in ok))
    med["reports_per_s"] = rounded(
        median((r.get("portal_latency") or {}).get("reports_per_s") for r in ok), 1
    )
    med["ingest_p50_ms"] = rounded(median((r.get("ingest") or {}).get("latency_p50_ms") for r in ok))
    med["ingest_p99_ms"] = rounded(median((r.get("ingest") or {}).get("latency_p99_ms") for r in ok))
    med["completed_runs"] = sum(1 for r in ok if r.get("completed"))
    return med


def _print_run(run: dict[str, Any]) -> None:
    if "error" in run:
        console.print(f"[red]failed: {run['error']}[/]  logs: {run.get('logs', '-')}")
        return
    parts = [f"{run.get('wall_s')} s", f"{run.get('devices_per_s')} devices/s"]
    parts.append(f"{run.get('cpu_ms_per_device')} ms CPU/device")
    if "celery_tasks" in run:
        parts.append(f"{run['celery_tasks']['per_device']} tasks/device")
    if "portal_latency" in run:
        lat = run["portal_latency"]
        parts.append(f"portal p50 {lat['p50_ms']} / p99 {lat['p99_ms']} ms")
    if run.get("peak_in_flight") is not None:
        parts.append(f"peak in flight {run['peak_in_flight']}")
    console.print(
        "  " + ", ".join(parts) + f"  [{run.get('status', 'ok' if run.get('completed') else 'capped')}]"
    )
    for role, lines in (run.get("log_trouble") or {}).items():
        console.print(f"  [yellow]{role} log:[/] {lines[0][:160]}")


def ratios(scenarios: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    zero = {e["devices"]: e["median"] for e in scenarios.get("zero_delay", [])}
    raw = {e["devices"]: e["median"] for e in scenarios.get("raw_mqtt", [])}
    for n, fleet in zero.items():
        ref = raw.get(n)
        if ref and fleet.get("devices_per_s") and ref.get("devices_per_s"):
            out[f"raw_mqtt_vs_fleet_speed_{n}"] = round(ref["devices_per_s"] / fleet["devices_per_s"], 1)
        if ref and fleet.get("cpu_ms_per_device") and ref.get("cpu_ms_per_device"):
            out[f"fleet_vs_raw_mqtt_cpu_{n}"] = round(
                fleet["cpu_ms_per_device"] / ref["cpu_ms_per_device"], 1
            )
    naive = scenarios.get("naive")
    if naive and "error" not in naive and zero:
        n = naive["devices"]
        nearest = min(zero, key=lambda size: abs(size - n))
        fleet = zero[nearest]
        if fleet.get("devices_per_s") and naive.get("devices_per_s"):
            out[f"fleet_{nearest}_vs_naive_{n}_speed"] = round(
                fleet["devices_per_s"] / naive["devices_per_s"], 2
            )
        if fleet.get("cpu_ms_per_device") and naive.get("cpu_ms_per_device"):
            out[f"fleet_{nearest}_vs_naive_{n}_cpu"] = round(
                fleet["cpu_ms_per_device"] / naive["cpu_ms_per_device"], 2
            )
    real = scenarios.get("realistic")
    if real and "error" not in real["fleet"] and "error" not in real["naive"]:
        fleet, naive_real = real["fleet"], real["naive"]
        if fleet.get("devices_per_s") and naive_real.get("devices_per_s"):
            out["realistic_fleet_vs_naive_speed"] = round(
                fleet["devices_per_s"] / naive_real["devices_per_s"], 1
            )
        if fleet.get("cpu_ms_per_device") and naive_real.get("cpu_ms_per_device"):
            out["realistic_fleet_vs_naive_cpu"] = round(
                fleet["cpu_ms_per_device"] / naive_real["cpu_ms_per_device"], 2
            )
    slow = scenarios.get("slow_download")
    if slow and naive and slow.get("profile") and naive.get("devices_per_s"):
        # A blocking task holds a worker process for the device's whole update.
        per_device = slow["profile"]["seconds_per_device_transfer"]
        conc = slow.get("configured_concurrency", 2)
        out["naive_slow_download_estimate_s"] = round(slow["devices"] * per_device / conc, 0)
    return out


def target_checks(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    zero = {e["devices"]: e["median"] for e in scenarios.get("zero_delay", [])}

    def add(key: str, measured: Any, ok: bool | None, where: str) -> None:
        text = TARGETS[key]["text"]
        rows.append({"target": text, "key": key, "measured": measured, "met": ok, "at": where})

    big = zero.get(10000)
    if big:
        completed = big.get("completed_runs", 0) > 0
        wall = big.get("wall_s") if completed else None
        ended = big.get("all_devices_ended_after_s")
        measured = wall if completed else f"not COMPLETED; all devices ended after {_fmt(ended)} s"
        met = completed and wall is not None and wall < 60
        add("zero_delay_10k_wall_s", measured, met, "zero-delay 10000")
        cpu, cpu_stack = big.get("cpu_ms_per_device"), big.get("cpu_ms_per_device_without_simulator")
        add(
            "zero_delay_10k_cpu_ms_per_device",
            f"{_fmt(cpu)} ({_fmt(cpu_stack)} without the simulator)",
            cpu is not None and cpu < 15,
            "zero-delay 10000",
        )
        create = big.get("create_rollout_s")
        add("create_rollout_10k_s", create, create is not None and create < 1, "zero-delay 10000")
        raw = {e["devices"]: e["median"] for e in scenarios.get("raw_mqtt", [])}.get(10000)
        if raw and raw.get("devices_per_s") and big.get("devices_per_s"):
            share = big["devices_per_s"] / raw["devices_per_s"]
            add("zero_delay_10k_half_raw", f"{share:.0%}", share >= 0.5, "zero-delay 10000")
        if cpu is not None and cpu_stack is not None:
            add(
                "zero_delay_10k_cpu_8ms",
                f"{_fmt(cpu)} ({_fmt(cpu_stack)} without the simulator)",
                cpu <= 8 and cpu_stack <= 5,
                "zero-delay 10000",
            )
        rss, pss = big.get("peak_rss_without_simulator_mib"), big.get("peak_pss_without_simulator_mib")
        if rss is not None:
            add(
                "stack_rss_10k_mib",
                f"{_fmt(rss)} MiB RSS ({_fmt(pss)} PSS)",
                rss * 2**20 <= 400e6,
                "zero-delay 10000",
            )
    naive = scenarios.get("naive")
    if naive and "error" not in naive and zero.get(naive["devices"]):
        fleet = zero[naive["devices"]]
        speed, cpu_n = fleet.get("devices_per_s"), fleet.get("cpu_ms_per_device")
        if speed and cpu_n and naive.get("devices_per_s") and naive.get("cpu_ms_per_device"):
            speed_ratio = speed / naive["devices_per_s"]
            cpu_ratio = cpu_n / naive["cpu_ms_per_device"]
            add(
                "fleet_vs_naive_1k",
                f"{speed_ratio:.2f}x naive speed, {cpu_ratio:.2f}x its CPU",
                speed_ratio >= 1 and cpu_ratio <= 1.5,
                f"zero-delay {naive['devices']}",
            )
    if zero:
        n = max(zero)
        largest = zero[n]
        tasks = largest.get("celery_tasks_per_device")
        add("celery_tasks_per_device", tasks, tasks is not None and tasks <= 3.5, f"zero-delay {n}")
        p50, p99 = largest.get("portal_p50_ms"), largest.get("portal_p99_ms")
        rate = largest.get("reports_per_s")
        where = f"zero-delay {n}, {_fmt(rate)} reports/s"
        add("portal_latency_p50_ms", p50, p50 is not None and p50 < 5, where)
        add("portal_latency_p99_ms", p99, p99 is not None and p99 < 50, where)
    slow = scenarios.get("slow_download")
    if slow and "error" not in slow:
        n = slow["devices"]
        where = f"slow-download {n}, peak {slow.get('peak_in_flight')} in flight"
        slots, conc = slow.get("worker_pool_processes"), slow.get("configured_concurrency")
        add("slow_download_worker_slots", f"{slots} (configured {conc})", slots == conc, where)
        rss, rss_stack = slow.get("peak_rss_total_mib"), slow.get("peak_rss_without_simulator_mib")
        add(
            "slow_download_total_rss_mib",
            f"{_fmt(rss_stack)} MiB without the simulator, {_fmt(rss)} MiB with it",
            rss_stack is not None and rss_stack < 1536,
            where,
        )
    return rows


# ====================================================================== output
def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    else:
        text = f"{value:,}" if isinstance(value, int) else str(value)
    return text + suffix


def _pair(a: Any, b: Any) -> str:
    return f"{_fmt(a)} / {_fmt(b)}"


def print_tables(report: dict[str, Any]) -> None:
    scen = report["scenarios"]
    table = Table(title="rollout throughput (medians where repeated)", title_justify="left")
    columns = ("scenario", "devices", "wall s", "devices/s", "CPU ms/dev all / w/o sim", "tasks/dev",
               "portal p50/p99 ms", "ingest p50/p99 ms", "peak MiB w/o sim RSS / PSS", "note")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("scenario", "note") else "right")
    for entry in scen.get("zero_delay", []):
        m = entry["median"]
        runs = entry["runs"]
        notes = []
        if m.get("completed_runs") != len(runs):
            notes.append(f"{m.get('completed_runs')}/{len(runs)} COMPLETED")
            notes.append(f"all devices ended after {_fmt(m.get('all_devices_ended_after_s'))} s")
        notes += [r["error"][:60] for r in runs if "error" in r][:1]
        if m.get("create_rollout_s") is not None:
            notes.append(f"create {m['create_rollout_s']} s")
        table.add_row(
            "fleet zero-delay",
            _fmt(entry["devices"]),
            _fmt(m.get("wall_s")),
            _fmt(m.get("devices_per_s")),
            _pair(m.get("cpu_ms_per_device"), m.get("cpu_ms_per_device_without_simulator")),
            _fmt(m.get("celery_tasks_per_device")),
            _pair(m.get("portal_p50_ms"), m.get("portal_p99_ms")),
            _pair(m.get("ingest_p50_ms"), m.get("ingest_p99_ms")),
            _pair(m.get("peak_rss_without_simulator_mib"), m.get("peak_pss_without_simulator_mib")),
            "; ".join(notes),
        )
    slow = scen.get("slow_download")
    if slow:
        note = slow.get("error", "")[:60] or (
            f"peak in flight {slow.get('peak_in_flight')} at {slow.get('peak_in_flight_after_s')} s; "
            f"worker pool {slow.get('worker_pool_processes')} processes; {slow.get('status')}"
        )
        ingest = slow.get("ingest") or {}
        table.add_row(
            f"fleet slow-download ({slow.get('profile', {}).get('fetch', '?')})",
            _fmt(slow["devices"]),
            _fmt(slow.get("wall_s")),
            _fmt(slow.get("devices_per_s")),
            _pair(slow.get("cpu_ms_per_device"), slow.get("cpu_ms_per_device_without_simulator")),
            _fmt((slow.get("celery_tasks") or {}).get("per_device")),
            "-",
            _pair(ingest.get("latency_p50_ms"), ingest.get("latency_p99_ms")),
            _pair(slow.get("peak_rss_without_simulator_mib"), slow.get("peak_pss_without_simulator_mib")),
            note,
        )
    if scen.get("naive"):
        _naive_row(table, scen["naive"], "naive: blocking task/device")
    for entry in scen.get("raw_mqtt", []):
        m = entry["median"]
        table.add_row(
            "raw MQTT round trip",
            _fmt(entry["devices"]),
            _fmt(m.get("wall_s")),
            _fmt(m.get("devices_per_s")),
            _pair(m.get("cpu_ms_per_device"), m.get("cpu_ms_per_device_without_simulator")),
            "0",
            "-",
            "-",
            "-",
            "no orchestration; this process publishes",
        )
    real = scen.get("realistic")
    if real:
        run = real["fleet"]
        ingest = run.get("ingest") or {}
        lat = run.get("portal_latency") or {}
        note = run.get("error", "")[:60] or f"peak in flight {run.get('peak_in_flight')}; {run.get('status')}"
        table.add_row(
            "fleet realistic",
            _fmt(run["devices"]),
            _fmt(run.get("wall_s")),
            _fmt(run.get("devices_per_s")),
            _pair(run.get("cpu_ms_per_device"), run.get("cpu_ms_per_device_without_simulator")),
            _fmt((run.get("celery_tasks") or {}).get("per_device")),
            _pair(lat.get("p50_ms"), lat.get("p99_ms")),
            _pair(ingest.get("latency_p50_ms"), ingest.get("latency_p99_ms")),
            _pair(run.get("peak_rss_without_simulator_mib"), run.get("peak_pss_without_simulator_mib")),
            note,
        )
        _naive_row(table, real["naive"], "naive realistic")
    console.print(table)
    _print_ratios_and_targets(report)


def _naive_row(table: Table, naive: dict[str, Any], label: str) -> None:
    if naive.get("error"):
        note = naive["error"][:60]
    elif naive.get("capped"):
        note = (
            f"stopped at {naive['time_cap_s']:.0f} s with {naive['finished']} done; "
            f"{_fmt(naive.get('extrapolated_wall_s'))} s extrapolated"
        )
    else:
        note = "two devices at a time (concurrency 2)"
    table.add_row(
        label,
        _fmt(naive["devices"]),
        _fmt(naive.get("wall_s")),
        _fmt(naive.get("devices_per_s")),
        _pair(naive.get("cpu_ms_per_device"), naive.get("cpu_ms_per_device_without_simulator")),
        "1",
        "-",
        "-",
        _fmt(naive.get("peak_rss_total_mib")),
        note,
    )


def _print_profiles(report: dict[str, Any]) -> None:
    for run in _all_runs(report["scenarios"]):
        for process, summary in (run.get("profiles") or {}).items():
            table = Table(
                title=f"{run['devices']} devices, {process}: top functions ({summary['samples']} samples)",
                title_justify="left",
            )
            table.add_column("self")
            table.add_column("share", justify="right")
            table.add_column("total (anywhere on the stack)")
            table.add_column("share", justify="right")
            for own, total in zip(summary["self"][:8], summary["total"][:8], strict=False):
                table.add_row(
                    own["function"], f"{own['share']:.0%}", total["function"], f"{total['share']:.0%}"
                )
            console.print(table)


def _print_ratios_and_targets(report: dict[str, Any]) -> None:
    _print_profiles(report)
    if report["ratios"]:
        ratio_table = Table(title="ratios", title_justify="left")
        ratio_table.add_column("comparison")
        ratio_table.add_column("value", justify="right")
        for key, value in report["ratios"].items():
            ratio_table.add_row(key, _fmt(value))
        console.print(ratio_table)

    targets = Table(title="targets (design section 9) and performance goals", title_justify="left")
    for col in ("target", "measured", "where", "met"):
        targets.add_column(col)
    for row in report["target_checks"]:
        met = "-" if row["met"] is None else ("[green]yes[/]" if row["met"] else "[red]no[/]")
        targets.add_row(row["target"], _fmt(row["measured"]), row["at"], met)
    console.print(targets)


# ====================================================================== main
def _git_commit() -> str:
    """The checked-out commit, with "+changes" when the work tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head}+changes" if dirty else head or "unknown"


def _all_runs(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for value in scenarios.values():
        if isinstance(value, list):
            runs.extend(r for entry in value for r in entry["runs"])
        elif "fleet" in value and "naive" in value:
            runs.extend((value["fleet"], value["naive"]))
        else:
            runs.append(value)
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scenario", default="all", help=f"comma-separated: {', '.join(SCENARIOS)} or all")
    parser.add_argument("--devices", default="1000,10000", help="sizes for zero-delay and raw-mqtt")
    parser.add_argument("--quick", action="store_true", help="200 devices in every scenario (smoke test)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (zero-delay, raw-mqtt); medians")
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes (main processes)")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    parser.add_argument(
        "--ingests", type=int, default=1, help="ingest processes (more than one: MQTT shared subscription)"
    )
    parser.add_argument(
        "--database-url", default=None, help="PostgreSQL server URL; a fresh database is made"
    )
    parser.add_argument("--slow-devices", type=int, default=10000)
    parser.add_argument(
        "--slow-fetch",
        choices=("http", "skip"),
        default="skip",
        help="http: real downloads from the API; skip: no transfer, devices hold in INSTALLING instead",
    )
    parser.add_argument("--slow-bandwidth", type=int, default=10000, help="bytes/s per device (http)")
    parser.add_argument("--slow-http-connections", type=int, default=2000, help="simulator HTTP pool")
    parser.add_argument(
        "--slow-seconds", type=float, default=60.0, help="install time with --slow-fetch skip"
    )
    parser.add_argument("--slow-cap", type=float, default=300.0, help="stop measuring after this (s)")
    parser.add_argument("--naive-devices", type=int, default=1000)
    parser.add_argument("--naive-cap", type=float, default=120.0, help="seconds before the naive run stops")
    parser.add_argument("--realistic-devices", type=int, default=1000)
    parser.add_argument(
        "--realistic-timeout", type=float, default=900.0, help="fleet's realistic rollout timeout (s)"
    )
    parser.add_argument(
        "--timeout-per-1k", type=float, default=60.0, help="rollout timeout per 1,000 devices"
    )
    parser.add_argument("--mosquitto-max-queued", type=int, default=None, help="override Mosquitto's 1000")
    parser.add_argument(
        "--profile-seconds",
        type=int,
        default=0,
        help="attach py-spy to ingest, worker(s), beat and simulator for this long in each fleet run",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep logs and databases (path printed)")
    args = parser.parse_args(argv)
    args.scenarios = (
        list(SCENARIOS) if args.scenario == "all" else [s.strip() for s in args.scenario.split(",")]
    )
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    args.sizes = [int(x) for x in args.devices.split(",") if x.strip()]
    if args.quick:
        args.sizes = [200]
        args.slow_devices = 200
        args.slow_seconds = min(args.slow_seconds, 2.0)
        args.naive_devices = 200
        args.realistic_devices = 50
        args.naive_cap = min(args.naive_cap, 60.0)
        args.slow_bandwidth = max(args.slow_bandwidth, 100_000)  # 2 s per transfer
    per_1k = args.timeout_per_1k
    args.timeout = lambda n: max(60.0, per_1k * n / 1000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if find_mosquitto() is None:
        console.print(
            "[red]mosquitto >= 2.0 not found (apt-get install mosquitto): it is the benchmark broker[/]"
        )
        return 2
    base = Path(tempfile.gettempdir()) / f"fleet-bench-{os.getuid()}"
    run_dir = base / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    cleanup_stale(run_dir)  # servers left by a benchmark that was killed
    work = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t_start = time.monotonic()
    report: dict[str, Any] = {}
    redis_server: RedisServer | None = None
    broker: MosquittoBroker | None = None
    try:
        redis_server = RedisServer(run_dir=run_dir).start()
        broker_log = work / "mosquitto.log"
        extra = [f"log_dest file {broker_log}", "log_type notice"]
        if args.mosquitto_max_queued is not None:
            extra.append(f"max_queued_messages {args.mosquitto_max_queued}")
        broker = MosquittoBroker(run_dir=run_dir, extra_config=extra)
        broker.start()
        engine_client.use_settings(Settings(redis_url=redis_server.url))
        console.print(f"[bold]redis[/] {redis_server.url}  [bold]mosquitto[/] {broker.url}  work dir {work}")
        bench = Bench(args, work, run_dir, redis_server, broker, broker_log, notes=[])
        scenarios = run_all(bench)
        report = {
            "meta": {
                "started": started,
                "duration_s": round(time.monotonic() - t_start, 1),
                "machine": machine_facts(),
                "versions": {
                    **package_versions(PACKAGES),
                    "mosquitto": binary_version([str(broker.executable), "-h"]),
                    "redis-server": binary_version([str(redis_server.executable), "--version"]),
                },
                "options": {
                    k: v for k, v in vars(args).items() if k not in ("timeout", "output") and not callable(v)
                },
                "database": "postgresql" if args.database_url else "sqlite",
                "commit": _git_commit(),
                "stack": (
                    f"API, {args.ingests} ingest(s), {args.workers} worker(s) x concurrency "
                    f"{args.concurrency}, beat"
                ),
                "notes": [
                    "CPU = utime+stime of every process of the stack's process trees (worker pool "
                    "children included), Redis, Mosquitto and the simulator, sampled from /proc every 0.5 s",
                    "the benchmark process (latency probe, SQL progress polling) is not counted in "
                    "fleet scenarios; in raw-mqtt it is the orchestrator and is counted",
                    *bench.notes,
                ],
            },
            "targets": TARGETS,
            "scenarios": scenarios,
        }
        report["ratios"] = ratios(scenarios)
        report["target_checks"] = target_checks(scenarios)
    finally:
        if broker is not None:
            broker.stop()
        if redis_server is not None:
            redis_server.stop()
        trouble = [
            r for r in _all_runs(report.get("scenarios", {})) if "error" in r or not r.get("completed")
        ]
        if args.keep or trouble or not report:
            console.print(f"logs and data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if not report:
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_tables(report)
    console.print(f"written to {args.output} ({report['meta']['duration_s']} s)")
    failed = [r for r in _all_runs(report["scenarios"]) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
