"""Chaos run: one rollout through a schedule of server-side faults, next to the same rollout undisturbed.

A private stack per run (Redis, Mosquitto with persistence, SQLite or a private PostgreSQL cluster
started with the machine's own initdb/pg_ctl, API, ingest, one Celery worker, beat) and a simulated
fleet (``realistic`` profile by default, real HTTP downloads, reboots with the device offline).
The chaos run injects, spread over the rollout:

  worker SIGKILL (whole process group) x3, broker restart, Redis restart with its AOF, Redis restart
  with its data wiped (no persistence: every queued step lost), API restart, ingest restart, and with
  PostgreSQL a database restart.

The verdict table gives per fault the seconds until progress resumed (the next report applied, the
next update ended, both counted from the moment the fault was injected); the end states; installs
per device counted on the device side; reports the devices sent against reports the database
recorded; updates that needed a second attempt; service processes that exited on their own; and
the wall time against the undisturbed run. Writes benchmarks/results/chaos.json. Every wait is
bounded; it stops by itself.

    python benchmarks/chaos.py [--devices 1000] [--database sqlite|postgres] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks._bench_common import ReadOnlyMonitor, machine_facts, package_versions  # noqa: E402
from device_sim.fleet import FleetConfig, spawn_fleet  # noqa: E402
from orchestrator.config import Settings  # noqa: E402
from orchestrator.db import session_scope, upgrade_database  # noqa: E402
from orchestrator.embedded import MosquittoBroker, RedisServer, cleanup_stale, find_mosquitto  # noqa: E402
from orchestrator.embedded.postgres_cluster import PostgresCluster  # noqa: E402
from orchestrator.embedded.stack_secrets import StackSecrets  # noqa: E402
from orchestrator.engine import client as engine_client  # noqa: E402
from orchestrator.local_stack import LocalStack, StackSettings, wait_until  # noqa: E402
from orchestrator.models import Device  # noqa: E402
from orchestrator.policy import RolloutPolicy, Target  # noqa: E402
from orchestrator.services import rollout_service  # noqa: E402
from orchestrator.services.firmware_service import add_firmware  # noqa: E402
from orchestrator.services.rollout_planner import create_rollout  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "chaos.json"
SAMPLE = ROOT / "firmware_samples" / "sensor-v2" / "1.1.0.bin"
END = ("SUCCEEDED", "FAILED", "ROLLED_BACK", "TIMED_OUT", "SKIPPED", "CANCELED")
console = Console()


# ====================================================================== the stack of one run
@dataclass
class Run:
    """Everything one run starts; :meth:`close` stops it all."""

    name: str
    work: Path
    args: argparse.Namespace
    redis: RedisServer | None = None
    broker: MosquittoBroker | None = None
    postgres: PostgresCluster | None = None
    stack: LocalStack | None = None
    fleet: Any = None
    database_url: str = ""
    stats_file: Path | None = None
    keys: StackSecrets | None = None
    unexpected_exits: list[str] = field(default_factory=list)
    exit_logs: dict[str, str] = field(default_factory=dict)  # last log lines of each of those
    _expected_down: set[str] = field(default_factory=set)

    def start(self) -> None:
        run_dir = self.work / "run"
        cleanup_stale(run_dir)
        keys = StackSecrets.load_or_create(self.work)
        self.redis = RedisServer(run_dir=run_dir, data_dir=self.work / "redis", appendonly=True).start()
        broker_log = [
            f"log_dest file {self.work / 'mosquitto.log'}",
            "log_type notice",
            "connection_messages true",
        ]
        self.broker = MosquittoBroker(run_dir=run_dir, data_dir=self.work / "mqtt", extra_config=broker_log)
        self.broker.start()
        if self.args.database == "postgres":
            self.postgres = PostgresCluster().start()  # in the system temp dir: postgres must reach it
            self.database_url = self.postgres.create_database("fleet")
        else:
            self.database_url = f"sqlite:///{self.work / 'fleet.db'}"
        upgrade_database(self.database_url)
        celery_broker = self.args.celery_broker_url
        if celery_broker:
            purge_celery_queue(celery_broker)
        engine_client.use_settings(
            Settings(
                redis_url=self.redis.url, database_url=self.database_url, celery_broker_url=celery_broker
            )
        )
        settings = StackSettings(
            data_dir=self.work / "stack",
            database_url=self.database_url,
            redis_url=self.redis.url,
            mqtt_url=self.broker.url,
            mqtt5=True,
            shared_subscriptions=self.args.ingests > 1,
            celery_broker_url=celery_broker,
            extra_env={
                "FLEET_SECRET_KEY": keys.secret_key,
                "FLEET_SIGNING_KEY_PATH": str(keys.signing_key),
                "FLEET_PUBLIC_KEY_PATH": str(keys.public_key),
                "FLEET_RECONCILE_INTERVAL_S": "2",
                "FLEET_STALL_S": str(self.args.stall),
            },
        )
        self.stack = LocalStack(settings)
        self.stack.start_all()
        for index in range(2, self.args.ingests + 1):
            self.stack.start_ingest(f"ingest{index}")
        self.stats_file = self.work / "fleet-stats.json"
        config = FleetConfig(
            broker_url=self.broker.url,
            devices=self.args.devices,
            model="sensor-v2",
            version="1.0.0",
            profile=self.args.profile,
            id_prefix="cx-",
            public_key=keys.public_key,
            stats_file=self.stats_file,
            params=dict(_speed(self.args)),
        )
        self.fleet = spawn_fleet(config)
        self.keys = keys

    def watch_processes(self) -> None:
        """Record service processes that exited although no fault stopped them."""
        assert self.stack is not None
        for name, process in self.stack.processes.items():
            if (
                name not in self._expected_down
                and not process.is_running()
                and name not in self.unexpected_exits
            ):
                self.unexpected_exits.append(name)
                self.exit_logs[name] = process.log_tail(40)
                console.print(f"[red]{name} exited on its own[/]; last lines:\n{self.exit_logs[name]}")

    def close(self) -> None:
        if self.fleet is not None and self.fleet.poll() is None:
            self.fleet.send_signal(signal.SIGTERM)
            try:
                self.fleet.wait(60)
            except Exception:
                self.fleet.kill()
        for thing in (self.stack, self.broker, self.redis):
            if thing is not None:
                try:
                    thing.stop()
                except Exception:
                    traceback.print_exc()
        if self.postgres is not None:
            self.postgres.destroy()


def purge_celery_queue(url: str) -> None:
    """Drop steps a previous run left in the ``fleet`` queue of a shared transport."""
    import kombu

    with kombu.Connection(url, connect_timeout=5) as conn:
        queue = kombu.Queue("fleet")
        with contextlib.suppress(Exception):
            queue.bind(conn.default_channel).purge()


def _speed(args: argparse.Namespace) -> dict[str, str]:
    if args.quick:
        # Seconds per device, so that every fault of the schedule lands while the rollout runs.
        return {"install_time": "2:4", "boot_time": "2:4", "offline_time": "1:2"}
    return {}


# ====================================================================== faults
@dataclass
class Fault:
    name: str
    act: Callable[[Run], None]
    at_s: float = 0.0
    took_s: float = 0.0
    resumed_after_s: float | None = None
    reports_resumed_after_s: float | None = None
    t0: float | None = None  # monotonic time it was injected (None: not injected)
    baseline: int = 0  # updates ended when it was injected
    reports_baseline: int = 0  # newest report event id when it was injected


def _kill_worker(run: Run) -> None:
    assert run.stack is not None
    running = [n for n, p in run.stack.processes.items() if n.startswith("worker") and p.is_running()]
    if not running:
        run.watch_processes()  # recorded as an unexpected exit, with its log
        run.stack.start_worker()
        return
    name = running[0]
    run._expected_down.add(name)
    run.stack.kill(name)  # SIGKILL to the whole process group: main process and pool
    time.sleep(1.0)
    run.stack.start_worker()


def _restart_broker(run: Run) -> None:
    assert run.broker is not None
    run.broker.restart()


def _restart_redis_aof(run: Run) -> None:
    assert run.redis is not None
    run.redis.restart()


def _restart_redis_wiped(run: Run) -> None:
    assert run.redis is not None and run.redis.data_dir is not None
    process = run.redis._process
    assert process is not None
    process.stop()
    for entry in run.redis.data_dir.iterdir():  # as a Redis without persistence comes back: empty
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    run.redis.restart()


def _restart_api(run: Run) -> None:
    assert run.stack is not None
    run._expected_down.add("api")
    run.stack.processes["api"].stop()
    run.stack.start_api()
    run._expected_down.discard("api")


def _restart_ingest(run: Run) -> None:
    assert run.stack is not None
    run._expected_down.add("ingest")
    run.stack.processes["ingest"].stop()
    run.stack.start_ingest()
    run._expected_down.discard("ingest")


def _restart_postgres(run: Run) -> None:
    assert run.postgres is not None
    run.postgres.restart(down_for=2.0)


def fault_schedule(args: argparse.Namespace) -> list[Fault]:
    faults = [
        Fault("worker SIGKILL 1", _kill_worker),
        Fault("broker restart", _restart_broker),
        Fault("Redis restart (AOF)", _restart_redis_aof),
        Fault("worker SIGKILL 2", _kill_worker),
        Fault("API restart", _restart_api),
        Fault("Redis restart (no persistence)", _restart_redis_wiped),
        Fault("ingest restart", _restart_ingest),
        Fault("worker SIGKILL 3", _kill_worker),
    ]
    if args.database == "postgres":
        faults.insert(5, Fault("PostgreSQL restart", _restart_postgres))
    return faults


# ====================================================================== one rollout
def _wait_registered(run: Run, timeout: float) -> None:
    def registered() -> bool:
        with session_scope(run.database_url) as s:
            from sqlalchemy import func, select

            return (s.scalar(select(func.count()).select_from(Device)) or 0) >= run.args.devices

    if not wait_until(registered, timeout, 0.5):
        raise RuntimeError("devices did not register")


def _start_rollout(run: Run) -> int:
    assert run.keys is not None
    settings = Settings(
        database_url=run.database_url,
        firmware_dir=run.work / "stack" / "firmware",
        signing_key_path=run.keys.signing_key,
        public_key_path=run.keys.public_key,
    )
    with session_scope(run.database_url) as session, SAMPLE.open("rb") as stream:
        firmware = add_firmware(session, settings, stream, model="sensor-v2", version="1.1.0")
        rollout = create_rollout(
            session,
            name="chaos",
            firmware_id=firmware.id,
            target=Target(model="sensor-v2"),
            policy=RolloutPolicy(waves=["5%", "25%", "60%", "100%"], success_threshold=0.9),
        )
        session.commit()
        rollout_service.start_rollout(session, rollout.id, actor="chaos")
        return rollout.id


class Progress:
    """Samples the number of ended updates twice a second (when the database answers)."""

    def __init__(self, url: str, rollout_id: int, total: int) -> None:
        self.url = url
        self.total = total
        self.rollout_id = rollout_id
        self.samples: list[tuple[float, int]] = []
        self.report_samples: list[tuple[float, int]] = []
        self.status = "RUNNING"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._monitor: ReadOnlyMonitor | None = None

    def start(self) -> Progress:
        self._thread.start()
        return self

    def _loop(self) -> None:
        ended_sql = "SELECT count(*) FROM device_updates WHERE rollout_id = :r AND state IN :ends"
        while not self._stop.wait(0.5):
            try:
                if self._monitor is None:
                    self._monitor = ReadOnlyMonitor(self.url)
                from sqlalchemy import bindparam, text

                conn = self._monitor._conn
                query = text(ended_sql).bindparams(bindparam("ends", expanding=True))
                ended = int(conn.execute(query, {"r": self.rollout_id, "ends": list(END)}).scalar() or 0)
                status = conn.execute(
                    text("SELECT status FROM rollouts WHERE id = :r"), {"r": self.rollout_id}
                ).scalar()
                applied = conn.execute(
                    text("SELECT max(id) FROM events WHERE kind = 'report' AND rollout_id = :r"),
                    {"r": self.rollout_id},
                ).scalar()
                conn.rollback()
                now = time.monotonic()
                self.samples.append((now, ended))
                self.report_samples.append((now, int(applied or 0)))
                self.status = str(status)
            except Exception:
                if self._monitor is not None:
                    with contextlib.suppress(Exception):
                        self._monitor.close()
                self._monitor = None  # the database is away: try again next round

    def ended_now(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._monitor is not None:
            self._monitor.close()

    def resumed(self, since: float, baseline: int) -> float | None:
        """Seconds from ``since`` until the ended count first rose above ``baseline``."""
        for t, ended in self.samples:
            if t >= since and ended > baseline:
                return round(t - since, 1)
        return None

    def reports_resumed(self, since: float, baseline: int) -> float | None:
        """Seconds from ``since`` until the applied-report count first rose above ``baseline``."""
        for t, applied in self.report_samples:
            if t >= since and applied > baseline:
                return round(t - since, 1)
        return None

    def reports_now(self) -> int:
        return self.report_samples[-1][1] if self.report_samples else 0


def run_once(args: argparse.Namespace, name: str, faults: list[Fault]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"fleet-chaos-{name}-"))
    run = Run(name=name, work=work, args=args)
    result: dict[str, Any] = {"name": name, "devices": args.devices, "database": args.database}
    progress: Progress | None = None
    try:
        with console.status(f"[{name}] starting the stack and {args.devices} devices…"):
            run.start()
            _wait_registered(run, 180)
        rollout_id = _start_rollout(run)
        started = time.monotonic()
        progress = Progress(run.database_url, rollout_id, args.devices).start()
        deadline = started + args.timeout
        spacing = args.spacing or float("inf")
        next_fault = started + spacing
        pending = list(faults)
        with console.status(f"[{name}] rollout running…") as status:
            while time.monotonic() < deadline:
                run.watch_processes()
                if progress.status in ("COMPLETED", "HALTED", "ABORTED"):
                    break
                if pending and time.monotonic() >= next_fault:
                    fault = pending.pop(0)
                    fault.at_s = round(time.monotonic() - started, 1)
                    baseline, reports_baseline = progress.ended_now(), progress.reports_now()
                    t0 = time.monotonic()
                    status.update(f"[{name}] fault: {fault.name}")
                    fault.act(run)
                    fault.took_s = round(time.monotonic() - t0, 1)
                    fault.baseline, fault.t0 = baseline, t0
                    fault.reports_baseline = reports_baseline
                    next_fault = time.monotonic() + spacing
                    console.print(f"  {fault.at_s:6.1f}s  {fault.name} ({fault.took_s}s)")
                time.sleep(0.25)
        wall = time.monotonic() - started
        settle_until = time.monotonic() + 30
        while time.monotonic() < settle_until and progress.ended_now() < args.devices:
            time.sleep(0.5)
        progress.stop()
        for fault in faults:
            if fault.t0 is not None:
                fault.resumed_after_s = progress.resumed(fault.t0, fault.baseline)
                fault.reports_resumed_after_s = progress.reports_resumed(fault.t0, fault.reports_baseline)
        result.update(_verdict(run, rollout_id, wall, progress.status))
        result["faults"] = [
            {
                k: getattr(f, k)
                for k in ("name", "at_s", "took_s", "reports_resumed_after_s", "resumed_after_s")
            }
            for f in faults
            if f.t0 is not None
        ]
        result["faults_not_injected"] = [f.name for f in faults if f.t0 is None]
    except Exception as exc:
        result["error"] = f"{exc.__class__.__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        result["processes_exited_on_their_own"] = list(run.unexpected_exits)
        result["exit_logs"] = dict(run.exit_logs)
        console.print(f"[red]{name} failed:[/] {exc}")
    finally:
        if progress is not None:
            progress.stop()
        run.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _verdict(run: Run, rollout_id: int, wall: float, status: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from orchestrator.models import DeviceUpdate, Event

    assert run.fleet is not None and run.stats_file is not None
    run.watch_processes()
    exits = list(run.unexpected_exits)
    run.fleet.send_signal(signal.SIGTERM)  # the fleet writes its statistics on the way out
    run.fleet.wait(60)
    device_side = json.loads(run.stats_file.read_text())
    with session_scope(run.database_url) as s:
        states = dict(
            s.execute(
                select(DeviceUpdate.state, func.count())
                .where(DeviceUpdate.rollout_id == rollout_id)
                .group_by(DeviceUpdate.state)
            ).all()
        )
        second = s.scalar(
            select(func.count()).where(DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.attempt > 1)
        )
        recorded = {
            (d, q) for d, q in s.execute(select(Event.device_id, Event.seq).where(Event.kind == "report"))
        }
    sent = {(device, seq) for device, seqs in device_side["sent"].items() for seq in seqs}
    installs = Counter(device_side["installs"].values())
    return {
        "status": status,
        "wall_s": round(wall, 1),
        "end_states": {str(k): v for k, v in states.items()},
        "all_succeeded": states.get("SUCCEEDED", 0) == run.args.devices,
        "installs_per_device": {str(k): v for k, v in sorted(installs.items())},
        "double_installs": sum(v for k, v in installs.items() if k > 1),
        "reports_sent": len(sent),
        "reports_recorded": len(sent & recorded),
        "reports_lost": len(sent - recorded),
        "second_attempts": int(second or 0),
        "processes_exited_on_their_own": exits,
        "exit_logs": dict(run.exit_logs),
        "device_reconnects": device_side["reconnects"],
    }


# ====================================================================== main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--profile", default="realistic")
    parser.add_argument("--spacing", type=float, default=None, help="seconds between faults")
    parser.add_argument("--stall", type=float, default=5.0, help="FLEET_STALL_S of the stack")
    parser.add_argument(
        "--ingests", type=int, default=1, help="ingest processes (more than one: $share group)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="longest a rollout may take")
    parser.add_argument(
        "--celery-broker-url",
        default=None,
        help="Celery on another transport, e.g. amqp://guest:guest@127.0.0.1:5672// (purged first)",
    )
    parser.add_argument("--quick", action="store_true", help="100 faster devices, a fault every 2 s (CI)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the undisturbed run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices = min(args.devices, 100)
        args.spacing = args.spacing or 2.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if find_mosquitto() is None:
        console.print("[red]the chaos run needs Mosquitto >= 2.0 (persistence); none found[/]")
        return 2
    report: dict[str, Any] = {
        "machine": machine_facts(),
        "packages": package_versions(["celery", "kombu", "redis", "sqlalchemy", "aiomqtt", "paho-mqtt"]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    baseline: dict[str, Any] | None = None
    if not args.no_baseline:
        baseline = run_once(args, "undisturbed", [])
        report["undisturbed"] = baseline
        console.print(f"undisturbed: {baseline.get('wall_s')} s, {baseline.get('end_states')}")
    if args.spacing is None:
        reference = (baseline or {}).get("wall_s") or (30.0 if args.quick else 90.0)
        # Every fault lands inside the rollout: worker restarts themselves take a few seconds.
        args.spacing = max(3.0, 0.6 * float(reference) / len(fault_schedule(args)))
    chaos = run_once(args, "chaos", fault_schedule(args))
    report["chaos"] = chaos
    if baseline and baseline.get("wall_s") and chaos.get("wall_s"):
        report["wall_ratio"] = round(chaos["wall_s"] / baseline["wall_s"], 2)
    print_report(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str))
    console.print(f"written to {args.output}")
    ok = "error" not in chaos and chaos.get("all_succeeded") and not chaos.get("reports_lost")
    return 0 if ok else 1


def print_report(report: dict[str, Any]) -> None:
    chaos = report["chaos"]
    if "error" in chaos:
        console.print(f"[red]chaos run failed: {chaos['error']}[/]")
        return
    faults = Table(title=f"faults ({chaos['devices']} devices, {chaos['database']})")
    columns = ("fault", "at s", "took s", "next report applied after s", "next update ended after s")
    for column in columns:
        faults.add_column(column)
    for f in chaos["faults"]:
        cells = (f["at_s"], f["took_s"], f["reports_resumed_after_s"], f["resumed_after_s"])
        faults.add_row(f["name"], *(str(c) for c in cells))
    console.print(faults)
    verdict = Table(title="verdict")
    verdict.add_column("check")
    verdict.add_column("chaos")
    verdict.add_column("undisturbed")
    base = report.get("undisturbed") or {}
    rows = [
        ("status", "status"),
        ("end states", "end_states"),
        ("installs per device (device side)", "installs_per_device"),
        ("devices installed twice", "double_installs"),
        ("reports sent / recorded / lost", None),
        ("updates with a second attempt", "second_attempts"),
        ("service processes that exited on their own", "processes_exited_on_their_own"),
        ("wall time s", "wall_s"),
    ]
    for label, key in rows:
        if key is None:
            value = f"{chaos['reports_sent']} / {chaos['reports_recorded']} / {chaos['reports_lost']}"
            other = (
                f"{base.get('reports_sent')} / {base.get('reports_recorded')} / {base.get('reports_lost')}"
            )
        else:
            value, other = str(chaos.get(key)), str(base.get(key, "-"))
        verdict.add_row(label, value, other)
    if "wall_ratio" in report:
        verdict.add_row("wall time chaos / undisturbed", str(report["wall_ratio"]), "1.0")
    console.print(verdict)


if __name__ == "__main__":
    raise SystemExit(main())
