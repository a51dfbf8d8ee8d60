"""Footprint of the simulated fleet: connect time and memory per device, plus one instant update.

Starts a private Mosquitto on a free loopback port, connects N simulated devices (default 2000)
in this process, measures RSS before and after, then (unless --no-update) offers every device an
update with the ``instant`` profile and times the round until every device reported SUCCEEDED.
Prints a table and writes benchmarks/results/sim_footprint.json. Stops by itself.

    python benchmarks/sim_footprint.py [--devices 2000] [--connect-concurrency 64] [--no-update]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from device_sim.fleet import FleetConfig, SimulatedFleet, raise_nofile_limit  # noqa: E402
from orchestrator.protocol import Desired, FirmwareRef, Stage, desired_topic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sim_footprint.json"
console = Console()


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_mosquitto() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def start_mosquitto(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n"
        "persistence false\nlog_type error\nmax_queued_messages 10000\n"
    )
    # The child inherits our raised RLIMIT_NOFILE: one descriptor per device on its side too.
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}") from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start listening")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(port: int, devices: int, concurrency: int, update: bool) -> dict[str, Any]:
    config = FleetConfig(
        broker_url=f"mqtt://127.0.0.1:{port}",
        devices=devices,
        profile="instant",
        id_prefix="bench-",
        connect_concurrency=concurrency,
    )
    gc.collect()
    rss_before = rss_kib()
    fleet = SimulatedFleet(config)
    t0 = time.perf_counter()
    await fleet.start(timeout=300)
    connect_s = time.perf_counter() - t0
    gc.collect()
    rss_after = rss_kib()
    await asyncio.sleep(2.0)  # a couple of keepalive/misc ticks: steady idle state
    gc.collect()
    rss_idle = rss_kib()
    result: dict[str, Any] = {
        "devices": devices,
        "connect_concurrency": concurrency,
        "connect_seconds": round(connect_s, 3),
        "devices_per_second": round(devices / connect_s, 1),
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_idle_kib": rss_idle,
        "kib_per_device": round((rss_after - rss_before) / devices, 2),
        "idle_kib_per_device": round((rss_idle - rss_before) / devices, 2),
    }
    if update:
        result["update"] = await run_update(fleet, port)
        gc.collect()
        result["rss_after_update_kib"] = rss_kib()
    t1 = time.perf_counter()
    await fleet.stop()
    result["stop_seconds"] = round(time.perf_counter() - t1, 3)
    return result


async def run_update(fleet: SimulatedFleet, port: int) -> dict[str, Any]:
    manifest = json.loads((ROOT / "firmware_samples" / "sensor-v2" / "1.1.0.json").read_text())
    firmware = FirmwareRef(**manifest, url="http://127.0.0.1:9/unused", token="unused")
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-orchestrator") as client:
        for device_id in fleet.device_ids:
            doc = Desired(update_id=1, attempt=1, stage=Stage.INSTALL, firmware=firmware).to_payload()
            await client.publish(desired_topic(device_id), doc, qos=1, retain=True)
        total = len(fleet.device_ids)
        await fleet.wait_until(lambda f: f.stats.finished["SUCCEEDED"] >= total, timeout=300)
        # Let the last reports reach the broker before reading the clock.
        await fleet.wait_until(lambda f: all(a.link.pending == 0 for a in f.agents), timeout=60)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
        for device_id in fleet.device_ids:
            await client.publish(desired_topic(device_id), b"", qos=1, retain=True)
    reports = sum(fleet.stats.reports.values())
    return {
        "seconds": round(elapsed, 3),
        "devices_per_second": round(total / elapsed, 1),
        "reports": reports,
        "reports_per_second": round(reports / elapsed, 1),
        "cpu_seconds": round(cpu, 3),
        "cpu_ms_per_device": round(1000 * cpu / total, 3),
        "note": "CPU of this process: the fleet plus the test client publishing desired documents",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--no-update", action="store_true", help="only connect, no update round")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    binary = find_mosquitto()
    if binary is None:
        console.print("[red]mosquitto not found (apt-get install mosquitto)[/red]")
        return 2
    limit = raise_nofile_limit()
    if limit < args.devices + 300:
        console.print(f"[yellow]RLIMIT_NOFILE is {limit}: too low for {args.devices} devices[/yellow]")
    with tempfile.TemporaryDirectory(prefix="sim-footprint-") as tmp:
        broker, port = start_mosquitto(binary, Path(tmp))
        try:
            run = measure(port, args.devices, args.connect_concurrency, not args.no_update)
            result = asyncio.run(asyncio.wait_for(run, 900))
        finally:
            broker.terminate()
            try:
                broker.wait(10)
            except subprocess.TimeoutExpired:
                broker.kill()
    result["environment"] = {
        "python": platform.python_version(),
        "aiomqtt": pkg_version("aiomqtt"),
        "paho_mqtt": pkg_version("paho-mqtt"),
        "broker": Path(binary).name,
        "cpus": os.cpu_count(),
        "nofile_limit": limit,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"simulated fleet footprint ({args.devices} devices, one process)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("connect time", f"{result['connect_seconds']:.2f} s")
    table.add_row("devices/s (connect)", f"{result['devices_per_second']:.0f}")
    table.add_row("RSS before", f"{result['rss_before_kib'] / 1024:.1f} MiB")
    table.add_row("RSS after connect", f"{result['rss_after_kib'] / 1024:.1f} MiB")
    table.add_row("KiB per device (connected)", f"{result['kib_per_device']:.1f}")
    table.add_row("KiB per device (idle 2 s later)", f"{result['idle_kib_per_device']:.1f}")
    if "update" in result:
        u = result["update"]
        rate = u["devices_per_second"]
        table.add_row("instant update, all devices", f"{u['seconds']:.2f} s ({rate:.0f}/s)")
        table.add_row("reports/s", f"{u['reports_per_second']:.0f}")
        table.add_row("CPU per device (update)", f"{u['cpu_ms_per_device']:.2f} ms")
        table.add_row("RSS after update", f"{result['rss_after_update_kib'] / 1024:.1f} MiB")
    table.add_row("stop (offline + disconnect)", f"{result['stop_seconds']:.2f} s")
    console.print(table)
    console.print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
