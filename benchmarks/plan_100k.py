"""A 100,000-device rollout: how long planning takes, and whether launching its first wave grows memory.

Starts a private Redis and Mosquitto, a SQLite database (or a fresh database on --database-url) with
--devices registered devices (default 100,000; none of them connected), one Celery worker and beat.
Then it creates a rollout over all of them (waves 10 %, 100 %; max_in_flight = the first wave) and
starts it: the worker starts the first wave in SQL and admits its 10,000 devices in chunks, each
offer published to a device that is not there. Measured: the time to create the rollout, the time
until the whole first wave is offered, and the RSS of the worker (every process of it) and of the
stack before, at its peak and after. Prints a table, writes benchmarks/results/plan_100k.json.

    python benchmarks/plan_100k.py [--devices 100000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import func, insert, select  # noqa: E402

from benchmarks._bench_common import (  # noqa: E402
    ScratchDatabase,
    descendants,
    machine_facts,
    pss_bytes,
    read_proc_table,
)
from orchestrator.config import Settings  # noqa: E402
from orchestrator.db import session_scope, upgrade_database  # noqa: E402
from orchestrator.embedded import MosquittoBroker, RedisServer, find_mosquitto  # noqa: E402
from orchestrator.engine import client as engine_client  # noqa: E402
from orchestrator.local_stack import LocalStack, StackSettings, wait_until  # noqa: E402
from orchestrator.models import Device, DeviceUpdate, Firmware, utcnow  # noqa: E402
from orchestrator.policy import RolloutPolicy, Target  # noqa: E402
from orchestrator.services.rollout_planner import create_rollout  # noqa: E402
from orchestrator.services.rollout_service import start_rollout  # noqa: E402
from orchestrator.state_machines import UpdateState  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "plan_100k.json"
console = Console()


def _tree_memory(roots: list[int | None]) -> tuple[int, int]:
    """Summed RSS and PSS of the process trees under ``roots``."""
    table = read_proc_table()
    pids = [p for root in roots if root is not None for p in descendants(table, root) if p in table]
    return sum(table[p].rss_bytes for p in pids), sum(pss_bytes(p) for p in pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--database-url", default=None, help="PostgreSQL server URL (default: SQLite)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if find_mosquitto() is None:
        console.print("[red]needs Mosquitto >= 2.0[/]")
        return 2
    work = Path(tempfile.mkdtemp(prefix="fleet-plan-"))
    redis_server = RedisServer(run_dir=work / "run").start()
    broker = MosquittoBroker(run_dir=work / "run").start()
    database = ScratchDatabase(args.database_url, work, "plan")
    url = database.create()
    report: dict[str, Any] = {"machine": machine_facts(), "devices": args.devices, "database": database.kind}
    stack = LocalStack(
        StackSettings(
            data_dir=work / "stack", database_url=url, redis_url=redis_server.url, mqtt_url=broker.url
        )
    )
    try:
        upgrade_database(url)
        engine_client.use_settings(Settings(redis_url=redis_server.url, database_url=url))
        now = utcnow()
        with console.status(f"registering {args.devices} devices…"), session_scope(url) as session:
            for start in range(0, args.devices, 10_000):
                rows = [
                    {
                        "id": f"d-{i:07d}",
                        "model": "sensor-v2",
                        "firmware_version": "1.0.0",
                        "labels": {},
                        "online": False,
                        "created_at": now,
                    }
                    for i in range(start, min(start + 10_000, args.devices))
                ]
                session.execute(insert(Device), rows)
            firmware = Firmware(
                model="sensor-v2",
                version="1.1.0",
                size=1,
                sha256="0" * 64,
                signature="x",
                storage_path="/dev/null",
            )
            session.add(firmware)
        first_wave = -(-args.devices // 10)
        policy = RolloutPolicy(waves=["10%", "100%"], max_in_flight=first_wave)
        t0 = time.perf_counter()
        with session_scope(url) as session:
            rollout = create_rollout(
                session, name="100k", firmware_id=firmware.id, target=Target(model="sensor-v2"), policy=policy
            )
            session.commit()
            rollout_id = rollout.id
        report["create_rollout_s"] = round(time.perf_counter() - t0, 2)
        stack.start_worker()
        stack.start_beat()
        worker = next(p for n, p in stack.processes.items() if n.startswith("worker"))
        roots = [p.pid for p in stack.processes.values()]
        time.sleep(5)  # beat and the worker's pool finish importing and run a first reconcile

        def measure() -> dict[str, int]:
            worker_rss, worker_pss = _tree_memory([worker.pid])
            stack_rss, stack_pss = _tree_memory(roots)
            return {
                "worker RSS": worker_rss,
                "worker PSS": worker_pss,
                "stack RSS": stack_rss,
                "stack PSS": stack_pss,
            }

        before = measure()
        peak = dict(before)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                for key, value in measure().items():
                    peak[key] = max(peak[key], value)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t1 = time.perf_counter()
        with session_scope(url) as session:
            start_rollout(session, rollout_id, actor="bench")

        def offered() -> int:
            with session_scope(url) as session:
                return int(
                    session.scalar(
                        select(func.count()).where(
                            DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.state == UpdateState.OFFERED
                        )
                    )
                    or 0
                )

        with console.status(f"launching the first wave ({first_wave} devices)…"):
            launched = wait_until(lambda: offered() >= first_wave, 600, 0.5)
        report["first_wave"] = first_wave
        report["first_wave_offered"] = offered()
        report["first_wave_launched_s"] = round(time.perf_counter() - t1, 1) if launched else None
        time.sleep(2)
        done.set()
        after = measure()
        report["memory_mib"] = {
            k: {
                "before": round(before[k] / 2**20, 1),
                "peak": round(peak[k] / 2**20, 1),
                "after": round(after[k] / 2**20, 1),
            }
            for k in before
        }
        report["note"] = "stack = worker (all pool processes) + beat; Redis and Mosquitto add about 80 MiB"
    finally:
        stack.stop()
        broker.stop()
        redis_server.stop()
        database.drop()
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title=f"a {args.devices:,}-device rollout ({report['database']})")
    table.add_column("measure")
    table.add_column("value")
    table.add_row("create the rollout (all rows, both waves)", f"{report['create_rollout_s']} s")
    table.add_row(f"offer the first wave of {report['first_wave']:,}", f"{report['first_wave_launched_s']} s")
    for k, v in report["memory_mib"].items():
        table.add_row(f"{k} MiB before / peak / after", f"{v['before']} / {v['peak']} / {v['after']}")
    console.print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    console.print(f"written to {args.output}")
    return 0 if report["first_wave_launched_s"] is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
