"""Helpers shared by the benchmarks: process-tree CPU/RSS sampling from /proc, percentiles,
a report -> portal latency probe, machine facts, and a fresh database per run.

Nothing here starts load by itself; every loop is bounded by the caller's deadline.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

_PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ------------------------------------------------------------------ /proc
@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    comm: str
    cpu_ticks: int  # utime + stime of this process only
    start_ticks: int
    rss_bytes: int


def read_proc_table() -> dict[int, ProcStat]:
    """One snapshot of every process on the machine (Linux /proc)."""
    table: dict[int, ProcStat] = {}
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        close = raw.rfind(")")
        comm = raw[raw.find("(") + 1 : close]
        fields = raw[close + 2 :].split()
        try:
            table[int(entry.name)] = ProcStat(
                pid=int(entry.name),
                ppid=int(fields[1]),
                comm=comm,
                cpu_ticks=int(fields[11]) + int(fields[12]),
                start_ticks=int(fields[19]),
                rss_bytes=int(fields[21]) * PAGE_SIZE,
            )
        except (IndexError, ValueError):
            continue
    return table


def descendants(table: Mapping[int, ProcStat], root: int) -> list[int]:
    """``root`` and every process below it, as found in ``table``."""
    if root not in table:
        return []
    children: dict[int, list[int]] = {}
    for st in table.values():
        children.setdefault(st.ppid, []).append(st.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


@dataclass
class RoleUsage:
    """What one role (a process tree such as "worker") used during a sampling window."""

    cpu_s: float = 0.0
    peak_rss_bytes: int = 0  # peak of the tree's summed RSS
    peak_process_rss_bytes: int = 0  # largest single process of the tree
    max_processes: int = 0
    cpu_by_process: dict[str, float] = field(default_factory=dict)  # "pid comm" -> CPU seconds


@dataclass
class ProcessSampler:
    """Samples CPU time and RSS of named process trees every ``interval`` seconds in a thread.

    ``roots`` maps a role name to a callable returning the tree's root pid (or None when the
    role is not running), or a list of pids counted one by one (e.g. PostgreSQL backends). CPU
    is the sum over the window of utime+stime of every process seen in the tree; a process that
    exits between two samples loses at most one interval of CPU time.
    """

    roots: Mapping[str, Callable[[], int | list[int] | None]]
    interval: float = 0.5
    aside: frozenset[str] = frozenset({"simulator"})  # roles also left out of the "stack" total
    usage: dict[str, RoleUsage] = field(default_factory=dict)
    peak_total_rss_bytes: int = 0
    peak_stack_rss_bytes: int = 0  # peak of the summed RSS of every role not in ``aside``
    # Summed RSS counts the pages a prefork parent shares with its children once per process;
    # PSS splits each shared page among its sharers, so its sum is the memory really used.
    peak_total_pss_bytes: int = 0
    peak_stack_pss_bytes: int = 0
    samples: int = 0
    machine_busy_s: float = 0.0  # whole machine during the window, for spotting outside load
    wall_s: float = 0.0
    _base: dict[tuple[int, int], int] = field(default_factory=dict)
    _last: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)
    _names: dict[tuple[int, int], str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started_at: float = 0.0
    _machine0: float = 0.0

    def start(self) -> ProcessSampler:
        self.usage = {role: RoleUsage() for role in self.roots}
        self._started_at = time.monotonic()
        self._machine0 = machine_busy_s()
        self._sample(baseline=True)
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, RoleUsage]:
        """Take a last sample, stop the thread and return the usage per role."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()
        self.machine_busy_s = machine_busy_s() - self._machine0
        self.wall_s = time.monotonic() - self._started_at
        with self._lock:
            for role in self.usage:
                self.usage[role].cpu_s = 0.0
                self.usage[role].cpu_by_process = {}
            for key, (role, ticks) in self._last.items():
                used = (ticks - self._base.get(key, 0)) / CLK_TCK
                self.usage[role].cpu_s += used
                self.usage[role].cpu_by_process[f"{key[0]} {self._names.get(key, '?')}"] = round(used, 3)
        return self.usage

    @property
    def total_cpu_s(self) -> float:
        return sum(u.cpu_s for u in self.usage.values())

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self, baseline: bool = False) -> None:
        table = read_proc_table()
        total_rss = stack_rss = total_pss = stack_pss = 0
        with self._lock:
            for role, root_of in self.roots.items():
                root = root_of()
                if isinstance(root, list):
                    pids = [pid for pid in root if pid in table]
                else:
                    pids = descendants(table, root) if root else []
                usage = self.usage[role]
                rss = pss = 0
                for pid in pids:
                    st = table[pid]
                    key = (pid, st.start_ticks)
                    if baseline:
                        self._base[key] = st.cpu_ticks
                    self._last[key] = (role, st.cpu_ticks)
                    self._names[key] = "main" if pid == root else st.comm
                    rss += st.rss_bytes
                    pss += pss_bytes(pid)
                    usage.peak_process_rss_bytes = max(usage.peak_process_rss_bytes, st.rss_bytes)
                usage.peak_rss_bytes = max(usage.peak_rss_bytes, rss)
                usage.max_processes = max(usage.max_processes, len(pids))
                total_rss += rss
                total_pss += pss
                if role not in self.aside:
                    stack_rss += rss
                    stack_pss += pss
            self.peak_total_rss_bytes = max(self.peak_total_rss_bytes, total_rss)
            self.peak_stack_rss_bytes = max(self.peak_stack_rss_bytes, stack_rss)
            self.peak_total_pss_bytes = max(self.peak_total_pss_bytes, total_pss)
            self.peak_stack_pss_bytes = max(self.peak_stack_pss_bytes, stack_pss)
            self.samples += 1


def pss_bytes(pid: int) -> int:
    """Proportional set size from /proc/PID/smaps_rollup (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def machine_busy_s() -> float:
    """CPU seconds spent by the whole machine (all CPUs, everything but idle and iowait) since boot."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0
    ticks = [int(x) for x in fields[:8]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / CLK_TCK


def self_cpu_s() -> float:
    """CPU seconds (user + system) of this process, all threads."""
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------ statistics
def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Iterable[float | None]) -> float | None:
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    mid = len(present) // 2
    return present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------ latency probe
class PortalLatencyProbe:
    """Report -> portal latency, both observed by one subscriber clock.

    Subscribes (QoS 0, so the broker never drops for it) to every device report and every portal
    device topic; a portal document matches the first report with the same (device, update,
    state, progress). Latency = portal arrival - report arrival.
    """

    def __init__(self, host: str, port: int, *, report_topic: str, portal_topic: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._mqtt = mqtt
        self.report_topic = report_topic
        self.portal_topic = portal_topic
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-probe-{secrets.token_hex(3)}"
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._subscribed = threading.Event()
        self._reports: dict[tuple[str, int, str, int], float] = {}
        self._matched: set[tuple[str, int, str, int]] = set()
        self.latencies_ms: list[float] = []
        self.reports = 0
        self.portal_messages = 0
        self.first_report: float | None = None
        self.last_report: float | None = None
        self.host, self.port = host, port

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, _reason: Any, _props: Any) -> None:
        client.subscribe([(self.report_topic, 0), (self.portal_topic, 0)])
        self._subscribed.set()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        now = time.perf_counter()
        payload = message.payload
        if not payload:
            return
        parts = message.topic.split("/")
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        if parts[-1] == "report":
            key = (parts[3], int(doc["update_id"]), str(doc["state"]), int(doc.get("progress", 0)))
            self.reports += 1
            self.first_report = self.first_report or now
            self.last_report = now
            self._reports.setdefault(key, now)
            return
        self.portal_messages += 1
        key = (str(doc["device_id"]), int(doc["update_id"]), str(doc["state"]), int(doc.get("progress", 0)))
        sent = self._reports.get(key)
        if sent is not None and key not in self._matched:
            self._matched.add(key)
            self.latencies_ms.append((now - sent) * 1000)

    def start(self, timeout: float = 10.0) -> PortalLatencyProbe:
        self.client.connect(self.host, self.port, keepalive=60)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise RuntimeError("latency probe could not subscribe")
        time.sleep(0.2)  # let the SUBACK settle before load starts
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def summary(self) -> dict[str, Any]:
        span = (self.last_report or 0) - (self.first_report or 0)
        return {
            "matched": len(self.latencies_ms),
            "reports_seen": self.reports,
            "portal_messages_seen": self.portal_messages,
            "reports_per_s": rounded(self.reports / span, 1) if span > 0 else None,
            "p50_ms": rounded(percentile(self.latencies_ms, 50)),
            "p99_ms": rounded(percentile(self.latencies_ms, 99)),
            "max_ms": rounded(max(self.latencies_ms) if self.latencies_ms else None),
        }


# ------------------------------------------------------------------ machine and versions
def machine_facts() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def package_versions(names: Iterable[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = pkg_version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def binary_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


# ------------------------------------------------------------------ databases
class ScratchDatabase:
    """A fresh database per benchmark run: a SQLite file in ``directory``, or a new database
    created on the PostgreSQL server of ``server_url`` (dropped again by :meth:`drop`)."""

    def __init__(self, server_url: str | None, directory: Path, name: str) -> None:
        self.server_url = server_url
        self.name = name
        self._created: str | None = None
        self._probe: Any = None
        if server_url is None:
            self.url = f"sqlite:///{directory / f'{name}.db'}"
            self.kind = "sqlite"
            return
        from sqlalchemy.engine import make_url

        base = make_url(server_url)
        if base.get_backend_name() != "postgresql":
            raise ValueError("--database-url must be a postgresql URL (SQLite is the default)")
        db_name = f"fleet_bench_{name}_{secrets.token_hex(3)}".lower().replace("-", "_")
        self.url = base.set(database=db_name).render_as_string(hide_password=False)
        self._admin_url = base.set(database="postgres").render_as_string(hide_password=False)
        self._db_name = db_name
        self.kind = "postgresql"

    def create(self) -> str:
        if self.kind == "postgresql":
            self._admin(f'CREATE DATABASE "{self._db_name}"')
            self._created = self._db_name
        return self.url

    def drop(self) -> None:
        if self._probe is not None:
            self._probe.dispose()
            self._probe = None
        if self._created is not None:
            self._admin(f'DROP DATABASE IF EXISTS "{self._created}" WITH (FORCE)')
            self._created = None

    def backend_pids(self) -> list[int]:
        """Server processes serving this database right now (PostgreSQL only; [] for SQLite)."""
        if self._created is None:
            return []
        from sqlalchemy import create_engine, text

        if self._probe is None:
            self._probe = create_engine(self._admin_url, isolation_level="AUTOCOMMIT", pool_size=1)
        try:
            with self._probe.connect() as conn:
                rows = conn.execute(
                    text("SELECT pid FROM pg_stat_activity WHERE datname = :d"), {"d": self._created}
                )
                return [int(r[0]) for r in rows]
        except Exception:
            return []

    def _admin(self, statement: str) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(self._admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(statement))
        finally:
            engine.dispose()


class ReadOnlyMonitor:
    """Cheap progress queries on the benchmark's database from outside the stack.

    Uses a plain SQLAlchemy engine (no ``BEGIN IMMEDIATE`` as the orchestrator's SQLite engine
    does) and ends every read at once, so it never holds SQLite's write lock or a long snapshot.
    """

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(url, pool_size=1) if not url.startswith("sqlite") else create_engine(url)
        self._conn = self.engine.connect()

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        from sqlalchemy import text

        try:
            result = [tuple(r) for r in self._conn.execute(text(sql), params)]
        finally:
            self._conn.rollback()
        return result

    def scalar(self, sql: str, **params: Any) -> Any:
        rows = self.rows(sql, **params)
        return rows[0][0] if rows else None

    def close(self) -> None:
        self._conn.close()
        self.engine.dispose()


def mib(value: float) -> float:
    return round(value / (1024 * 1024), 1)
