"""A flood of hostile reports from device logins against one ingest process; then one valid report.

Starts a private Redis, a private Mosquitto with fleet's users and per-role listeners, a SQLite
database with a rollout whose updates are offered, and one ingest process. Then --devices device
logins (default 20), each with its own password and only its own topics, publish --messages hostile
reports in total (default 10,000): integers beyond 64 bits, 1 MB payloads, oversized strings,
wrong types, forged update ids of other devices, replays of old seqs, broken JSON. Afterwards a
quiet device publishes one valid report.

Prints a table and writes benchmarks/results/ingest_flood.json: ingest's RSS before, at its peak and
after; whether it kept running; seconds from the end of the flood until the valid report was in
SQL; ingest's counters (rejected, throttled, oversized, ...); rows that changed other than the
valid one (must be none). Every wait is bounded; it stops by itself.

    python benchmarks/ingest_flood.py [--messages 10000] [--devices 20]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
import redis  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import insert, select  # noqa: E402

from benchmarks._bench_common import machine_facts, read_proc_table  # noqa: E402
from orchestrator.db import session_scope, upgrade_database  # noqa: E402
from orchestrator.embedded import MosquittoBroker, MqttUser, RedisServer, Role, find_mosquitto  # noqa: E402
from orchestrator.local_stack import LocalStack, StackSettings, wait_until  # noqa: E402
from orchestrator.models import Device, DeviceUpdate, Firmware, utcnow  # noqa: E402
from orchestrator.policy import RolloutPolicy, Target  # noqa: E402
from orchestrator.protocol import report_topic  # noqa: E402
from orchestrator.services.rollout_planner import create_rollout  # noqa: E402
from orchestrator.state_machines import UpdateEvent  # noqa: E402
from orchestrator.transitions import transition_update  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ingest_flood.json"
console = Console()


def hostile_payloads(own: int, other: int, count: int) -> list[bytes]:
    """``count`` payloads cycling through the kinds of abuse seen in the security review."""

    def report(**fields: Any) -> bytes:
        doc = {"update_id": own, "attempt": 1, "state": "DOWNLOADING", "seq": 1, "running_version": "1.0.0"}
        doc.update(fields)
        return json.dumps(doc).encode()

    kinds = [
        report(update_id=2**64),
        report(attempt=2**70),
        report(seq=2**64 + 1),
        report(running_version="v" * 7000),
        report(update_id="1", seq="2"),
        report(update_id=other, state="SUCCEEDED", seq=3),  # another device's update
        report(seq=1),  # a replay
        b"{broken json",
        b"\x00\xff" * 100,
        b"x" * 1_000_000,  # rejected unread
    ]
    return [kinds[i % len(kinds)] for i in range(count)]


def _rss(pid: int | None) -> int:
    table = read_proc_table()
    return table[pid].rss_bytes if pid in table else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if find_mosquitto() is None:
        console.print("[red]needs Mosquitto >= 2.0[/]")
        return 2
    work = Path(tempfile.mkdtemp(prefix="fleet-flood-"))
    service = MqttUser("service", secrets.token_urlsafe(16), Role.SERVICE)
    flooders = [MqttUser(f"fl-{i:03d}", secrets.token_urlsafe(12), Role.DEVICE) for i in range(args.devices)]
    quiet = MqttUser("quiet-1", secrets.token_urlsafe(12), Role.DEVICE)
    redis_server = RedisServer(run_dir=work / "run").start()
    broker = MosquittoBroker(run_dir=work / "run", users=[service, quiet, *flooders], allow_anonymous=False)
    broker.start()
    database_url = f"sqlite:///{work / 'fleet.db'}"
    upgrade_database(database_url)
    report: dict[str, Any] = {"machine": machine_facts(), "messages": args.messages, "devices": args.devices}
    stack = LocalStack(
        StackSettings(
            data_dir=work / "stack",
            database_url=database_url,
            redis_url=redis_server.url,
            mqtt_url=broker.service_url,
            extra_env={"FLEET_MQTT_USERNAME": service.username, "FLEET_MQTT_PASSWORD": service.password},
        )
    )
    try:
        own = _rollout(database_url, [quiet.username, *(u.username for u in flooders)])
        stack.start_ingest()
        ingest = stack.processes["ingest"]
        before = _snapshot(database_url)
        rss_before = _rss(ingest.pid)
        peak = rss_before
        sampling = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not sampling.wait(0.2):
                peak = max(peak, _rss(ingest.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        payloads = hostile_payloads(own[flooders[0].username], own[quiet.username], args.messages)
        clients = []
        kicked = 0

        def on_disconnect(*_args: Any) -> None:
            nonlocal kicked
            kicked += 1  # the broker drops a client that sends a packet over max_packet_size

        for user in flooders:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user.username)
            client.username_pw_set(user.username, user.password)
            client.max_inflight_messages_set(100)
            client.max_queued_messages_set(0)
            client.reconnect_delay_set(0.05, 0.5)
            client.on_disconnect = on_disconnect
            client.connect(broker.host, broker.port)
            client.loop_start()
            clients.append((user, client))
        t0 = time.monotonic()
        sent = 0
        # The 1 MB payloads last, from two of the logins: the broker drops a login on each one.
        ordered = sorted(enumerate(payloads), key=lambda ip: len(ip[1]) > 65536)
        for i, payload in ordered:
            big = len(payload) > 65536
            user, client = clients[i % 2] if big else clients[2 + i % (len(clients) - 2)]
            for _ in range(200):  # a client the broker just dropped reconnects by itself
                if client.publish(report_topic(user.username), payload, qos=1).rc == mqtt.MQTT_ERR_SUCCESS:
                    sent += 1
                    break
                time.sleep(0.01)
        wait_until(lambda: _ingest_stats(redis_server.url).get("received", 0) >= sent * 0.5, 30, 0.5)
        flood_s = time.monotonic() - t0
        # One valid report from a quiet device, right after the flood
        valid = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=quiet.username)
        valid.username_pw_set(quiet.username, quiet.password)
        valid.connect(broker.host, broker.port)
        valid.loop_start()
        doc = {
            "update_id": own[quiet.username],
            "attempt": 1,
            "state": "VERIFIED",
            "seq": 1,
            "running_version": "1.0.0",
        }
        t1 = time.monotonic()
        valid.publish(report_topic(quiet.username), json.dumps(doc), qos=1).wait_for_publish(10)
        applied = wait_until(lambda: _state(database_url, own[quiet.username]) == "VERIFIED", 60, 0.01)
        valid_after_s = time.monotonic() - t1
        time.sleep(2)
        sampling.set()
        after = _snapshot(database_url)
        changed = sorted(k for k in before if before[k] != after.get(k) and k != own[quiet.username])
        stats = _ingest_stats(redis_server.url)
        report.update(
            {
                "published": sent,
                "hostile_logins_disconnected_by_the_broker": kicked,
                "flood_s": round(flood_s, 2),
                "ingest_running": ingest.is_running(),
                "valid_report_applied": applied,
                "valid_report_applied_after_s": round(valid_after_s, 3),
                "ingest_rss_mib": {
                    "before": round(rss_before / 2**20, 1),
                    "peak": round(peak / 2**20, 1),
                    "after": round(_rss(ingest.pid) / 2**20, 1),
                },
                "rows_changed_illegally": changed,
                "ingest_counters": {
                    k: v
                    for k, v in stats.items()
                    if k.startswith(
                        ("malformed", "oversized", "throttled", "rejected", "ignored", "poison", "applied")
                    )
                    or k in ("received", "batches", "read_pauses", "backlog_peak")
                },
            }
        )
        for _, client in clients:
            client.disconnect()
            client.loop_stop()
        valid.disconnect()
        valid.loop_stop()
    finally:
        stack.stop()
        broker.stop()
        redis_server.stop()
    table = Table(
        title=f"ingest under a flood of {args.messages} hostile reports from {args.devices} device logins"
    )
    table.add_column("measure")
    table.add_column("value")
    for key in (
        "published",
        "hostile_logins_disconnected_by_the_broker",
        "flood_s",
        "ingest_running",
        "valid_report_applied",
        "valid_report_applied_after_s",
    ):
        table.add_row(key, str(report.get(key)))
    table.add_row(
        "ingest RSS MiB before / peak / after", " / ".join(str(v) for v in report["ingest_rss_mib"].values())
    )
    table.add_row("rows changed illegally", str(report["rows_changed_illegally"]))
    for key, value in sorted(report["ingest_counters"].items()):
        table.add_row(key, str(value))
    console.print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    console.print(f"written to {args.output}")
    ok = report["ingest_running"] and report["valid_report_applied"] and not report["rows_changed_illegally"]
    return 0 if ok else 1


def _rollout(database_url: str, device_ids: list[str]) -> dict[str, int]:
    """Devices, one firmware and a rollout with every update offered; device id -> update id."""
    now = utcnow()
    with session_scope(database_url) as session:
        session.execute(
            insert(Device),
            [
                {
                    "id": d,
                    "model": "sensor-v2",
                    "firmware_version": "1.0.0",
                    "labels": {},
                    "online": True,
                    "created_at": now,
                }
                for d in device_ids
            ],
        )
        firmware = Firmware(
            model="sensor-v2",
            version="1.1.0",
            size=1,
            sha256="0" * 64,
            signature="x",
            storage_path="/dev/null",
        )
        session.add(firmware)
        session.flush()
        rollout = create_rollout(
            session,
            name="flood",
            firmware_id=firmware.id,
            target=Target(device_ids=device_ids),
            policy=RolloutPolicy(waves=["100%"]),
        )
        session.flush()
        ids = {}
        for du in session.scalars(select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout.id)):
            transition_update(session, du, UpdateEvent.ENQUEUE)
            transition_update(session, du, UpdateEvent.OFFER)
            ids[du.device_id] = du.id
    return ids


def _state(database_url: str, update_id: int) -> str:
    with session_scope(database_url) as session:
        return str(session.get_one(DeviceUpdate, update_id).state)


def _snapshot(database_url: str) -> dict[int, tuple[Any, ...]]:
    with session_scope(database_url) as session:
        rows = session.execute(
            select(DeviceUpdate.id, DeviceUpdate.state, DeviceUpdate.version, DeviceUpdate.last_seq)
        )
        return {r[0]: tuple(r[1:]) for r in rows}


def _ingest_stats(url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    try:
        raw = client.hgetall("fleet:ingest:stats")
    finally:
        client.close()
    return json.loads(next(iter(raw.values()))) if raw else {}


if __name__ == "__main__":
    raise SystemExit(main())
