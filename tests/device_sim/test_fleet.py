"""Simulated fleets against a real broker: the Python API, the subprocess and the CLI."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import aiomqtt
import pytest
import typer
from typer.testing import CliRunner

from device_sim import cli
from device_sim.fleet import FleetConfig, SimulatedFleet, spawn_fleet
from device_sim.installer import SimulatedInstaller
from orchestrator.protocol import desired_topic
from tests.device_sim.helpers import (
    FirmwareServer,
    Observer,
    desired,
    firmware_ref,
    new_id,
    observing,
    run,
)

pytestmark = pytest.mark.integration


async def offer_all(obs: Observer, fleet: SimulatedFleet, payload_for: Any) -> None:
    await asyncio.gather(*(obs.send(d, payload_for(d)) for d in fleet.device_ids))


def test_instant_fleet_of_50_completes(mqtt_broker: Any, firmware_server: FirmwareServer) -> None:
    async def scenario() -> None:
        prefix = new_id("f") + "-"
        config = FleetConfig(broker_url=mqtt_broker.url, devices=50, id_prefix=prefix, labels={"site": "lab"})
        fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0")
        progress: list[tuple[int, int]] = []
        async with observing(mqtt_broker) as obs:
            await obs.watch_all()
            fleet = SimulatedFleet(config, on_progress=lambda done, total: progress.append((done, total)))
            async with fleet:
                assert fleet.connected == 50 and progress[-1] == (50, 50)
                assert fleet.device_ids[0] == f"{prefix}00000" and len(set(fleet.device_ids)) == 50
                await offer_all(obs, fleet, lambda d: desired(5, 1, "install", fw))
                await fleet.wait_until(lambda f: f.stats.finished["SUCCEEDED"] == 50, timeout=30)
                assert set(fleet.versions().values()) == {"1.1.0"}
                await obs.wait_for(
                    lambda: all("SUCCEEDED" in obs.states(d) for d in fleet.device_ids), what="all reports"
                )
                assert isinstance(fleet.installer, SimulatedInstaller)
                assert fleet.installer.total_installs == 50
                for device in fleet.device_ids:
                    seqs = [r.seq for r in obs.reports[device]]
                    assert seqs == sorted(seqs)
                    assert [s for s in obs.states(device)] == [
                        "DOWNLOADING", "DOWNLOADED", "VERIFIED", "INSTALLING", "REBOOTING", "SUCCEEDED",
                    ]  # fmt: skip
                # instant skips the transfer: no HTTP request at all
                assert firmware_server.requests_for("") == []
            for device in fleet.device_ids:
                await obs.send(device, b"")
            await obs.wait_for(
                lambda: all(obs.online.get(d, [""])[-1] == "offline" for d in fleet.device_ids),
                what="offline",
            )

    run(scenario())


def test_fault_injection(mqtt_broker: Any, firmware_server: FirmwareServer) -> None:
    """Rates at 1.0 make every device misbehave the same way; seeds make it reproducible."""

    async def scenario() -> None:
        fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0")
        cases = {
            "boot_failure": ("ROLLED_BACK", "boot_failure"),
            "corrupt": ("FAILED", "checksum"),
            "install_error": ("FAILED", "install_error"),
        }
        async with observing(mqtt_broker) as obs:
            await obs.watch_all()
            for rate, (state, error) in cases.items():
                config = FleetConfig(
                    broker_url=mqtt_broker.url,
                    devices=5,
                    id_prefix=new_id(rate[:4]) + "-",
                    fail_rates={rate: 1.0},
                )
                async with SimulatedFleet(config) as fleet:
                    await offer_all(obs, fleet, lambda d: desired(6, 1, "install", fw))
                    await fleet.wait_until(lambda f, s=state: f.stats.finished[s] == 5, timeout=20)
                    assert set(fleet.versions().values()) == {"1.0.0"}
                    ids = fleet.device_ids
                    await obs.wait_for(lambda s=state, ids=ids: all(obs.states(d)[-1:] == [s] for d in ids))
                    assert {obs.reports[d][-1].error for d in fleet.device_ids} == {error}

            # Silent devices connect but never answer.
            config = FleetConfig(broker_url=mqtt_broker.url, devices=3, id_prefix=new_id("sil") + "-")
            config.fail_rates = {"silent": 1.0}
            async with SimulatedFleet(config) as fleet:
                await offer_all(obs, fleet, lambda d: desired(7, 1, "install", fw))
                await asyncio.sleep(0.5)
                assert all(d not in obs.reports for d in fleet.device_ids)
                assert all(obs.online[d][-1] == "online" for d in fleet.device_ids)

            # Duplicates and reordering: every report twice, held-back reports after the next one.
            config = FleetConfig(
                broker_url=mqtt_broker.url,
                devices=3,
                id_prefix=new_id("dup") + "-",
                fail_rates={"duplicate": 1.0, "reorder": 1.0},
            )
            async with SimulatedFleet(config) as fleet:
                await offer_all(obs, fleet, lambda d: desired(8, 1, "install", fw))
                await fleet.wait_until(lambda f: f.stats.finished["SUCCEEDED"] == 3, timeout=20)
                await obs.wait_for(
                    lambda: all(obs.states(d).count("SUCCEEDED") == 2 for d in fleet.device_ids)
                )
                for device in fleet.device_ids:
                    seqs = [r.seq for r in obs.reports[device]]
                    assert len(seqs) > len(set(seqs)), "duplicates expected"
                    assert seqs != sorted(seqs), "out-of-order reports expected"
                    assert sorted(set(seqs)) == list(range(1, 7))

    run(scenario(), timeout=90)


def test_offline_mid_download_resumes(mqtt_broker: Any, firmware_server: FirmwareServer) -> None:
    async def scenario() -> None:
        prefix = new_id("off") + "-"
        config = FleetConfig(
            broker_url=mqtt_broker.url,
            devices=2,
            id_prefix=prefix,
            model="gateway-x1",
            fetch="http",
            fail_rates={"offline": 1.0},
            params={"offline_time": "0.5", "bandwidth": str(4 * 1024 * 1024)},
        )
        async with observing(mqtt_broker) as obs, SimulatedFleet(config) as fleet:
            await obs.watch_all()
            fws = {
                d: firmware_ref(firmware_server, "gateway-x1", "1.1.0", device=d) for d in fleet.device_ids
            }
            await offer_all(obs, fleet, lambda d: desired(9, 1, "install", fws[d]))
            await fleet.wait_until(lambda f: f.stats.finished["SUCCEEDED"] == 2, timeout=30)
            # The download resumes when the network is back; MQTT reconnects in parallel.
            await fleet.wait_until(lambda f: f.stats.reconnects >= 2, timeout=30)
            for device in fleet.device_ids:
                ranges = [r.range for r in firmware_server.requests_for(device)]
                assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
                await obs.wait_for(lambda d=device: "SUCCEEDED" in obs.states(d))
                assert "offline" in obs.online[device]  # the last will fired during the loss

    run(scenario())


def test_background_fleet(mqtt_broker: Any, firmware_server: FirmwareServer) -> None:
    """The synchronous API: a fleet in a thread, driven by plain MQTT publishes."""
    prefix = new_id("bg") + "-"
    config = FleetConfig(broker_url=mqtt_broker.url, devices=4, id_prefix=prefix)
    fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0")
    with SimulatedFleet(config).run_in_background() as handle:
        fleet = handle.fleet
        assert fleet.connected == 4

        async def publish() -> None:
            async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=new_id("pub")) as c:
                for device in fleet.device_ids:
                    await c.publish(desired_topic(device), desired(3, 1, "install", fw), qos=1, retain=True)

        run(publish())

        async def wait(f: SimulatedFleet) -> dict[str, str]:
            await f.wait_until(lambda x: x.stats.finished["SUCCEEDED"] == 4, timeout=20)
            return f.versions()

        assert set(handle.call(wait).values()) == {"1.1.0"}
    assert fleet.connected == 0


def test_subprocess_fleet_stops_cleanly(mqtt_broker: Any) -> None:
    prefix = new_id("sp") + "-"
    config = FleetConfig(broker_url=mqtt_broker.url, devices=20, id_prefix=prefix)

    async def watch_offline() -> None:
        async with observing(mqtt_broker) as obs:
            await obs.watch_all()
            proc = spawn_fleet(config, ready_timeout=60)
            try:
                ids = [f"{prefix}{i:05d}" for i in range(20)]
                await obs.wait_for(lambda: all(obs.online.get(d, [""])[-1] == "online" for d in ids))
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
                assert code == 0
                await obs.wait_for(lambda: all(obs.online[d][-1] == "offline" for d in ids), what="offline")
            finally:
                if proc.poll() is None:
                    proc.kill()

    run(watch_offline())


def test_cli_mounts_as_subcommand(mqtt_broker: Any) -> None:
    parent = typer.Typer()

    @parent.command()
    def version() -> None:
        """Another command, so that ``sim`` is a real sub-command."""

    parent.add_typer(cli.app, name="sim")
    prefix = new_id("cli") + "-"
    args = ["sim", "--devices", "3", "--broker", mqtt_broker.url, "--id-prefix", prefix, "--duration", "0.2"]
    result = CliRunner().invoke(parent, [*args, "--labels", "a=1,b=2", "--fail-rate", "install_error=0.5"])
    assert result.exit_code == 0, result.output
    assert "FLEET READY devices=3" in result.output

    bad = CliRunner().invoke(
        parent, ["sim", "--devices", "1", "--fail-rate", "nonsense=1", "--duration", "0"]
    )
    assert bad.exit_code != 0 and "unknown failure rate" in bad.output

    async def check_info() -> None:
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=new_id("i")) as c:
            topic = f"fleet/v1/devices/{prefix}00001/info"
            await c.subscribe(topic, qos=1)
            async for msg in c.messages:
                if msg.topic.value != topic:
                    continue  # amqtt may replay unrelated retained messages
                info = json.loads(msg.payload if isinstance(msg.payload, bytes) else b"{}")
                assert info["labels"] == {"a": "1", "b": "2"} and info["model"] == "sensor-v2"
                return

    run(check_info(), timeout=10)
