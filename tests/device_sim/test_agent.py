"""One agent against a real MQTT broker and a real HTTP firmware server."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from device_sim.agent import DeviceAgent
from device_sim.context import AgentContext
from device_sim.installer import CommandInstaller, SimulatedInstaller
from device_sim.state_store import JsonStateStore
from tests.device_sim.helpers import (
    HTTP_INSTANT,
    PUBLIC_KEY_PATH,
    SAMPLES,
    FirmwareServer,
    Observer,
    agent_context,
    desired,
    firmware_ref,
    observing,
    run,
    running_agent,
)

pytestmark = pytest.mark.integration

DOWNLOAD_STATES = ["DOWNLOADING", "DOWNLOADED", "VERIFIED"]
INSTALL_STATES = ["INSTALLING", "REBOOTING", "SUCCEEDED"]


def assert_seq_increasing(obs: Observer, device_id: str) -> None:
    seqs = [r.seq for r in obs.reports[device_id]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs


def test_download_then_install(mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str) -> None:
    async def scenario() -> None:
        installer = SimulatedInstaller()
        ctx = agent_context(mqtt_broker, installer=installer)
        fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id)
        async with observing(mqtt_broker, device_id) as obs, running_agent(ctx, device_id) as agent:
            await obs.wait_for(lambda: obs.online.get(device_id, [])[-1:] == ["online"], what="online")
            assert obs.info[device_id][-1]["running_version"] == "1.0.0"
            assert obs.info[device_id][-1]["slot"] == "a"

            await obs.send(device_id, desired(11, 1, "download", fw))
            await obs.wait_state(device_id, "VERIFIED")
            await asyncio.sleep(0.3)  # the agent must wait for the install stage
            assert obs.states(device_id)[-1] == "VERIFIED"
            assert installer.total_installs == 0
            assert obs.states(device_id)[0] == "DOWNLOADING"
            assert [s for s in obs.states(device_id) if s != "DOWNLOADING"] == ["DOWNLOADED", "VERIFIED"]

            await obs.send(device_id, desired(11, 1, "install", fw))
            final = await obs.wait_state(device_id, "SUCCEEDED")
            states = [s for s in obs.states(device_id) if s != "DOWNLOADING"]
            assert states == ["DOWNLOADED", "VERIFIED", *INSTALL_STATES]
            assert final.running_version == "1.1.0" and final.update_id == 11 and final.attempt == 1
            assert all(r.ts is not None for r in obs.reports[device_id])
            assert_seq_increasing(obs, device_id)
            await obs.wait_for(lambda: obs.info[device_id][-1]["running_version"] == "1.1.0", what="info")
            assert obs.info[device_id][-1]["slot"] == "b"
            assert agent.running_version == "1.1.0"
            assert installer.installs[(device_id, 11)] == 1
            # One full GET, with the bearer token.
            reqs = firmware_server.requests_for(device_id)
            assert [(r.status, r.range) for r in reqs] == [(200, None)]
            assert reqs[0].auth == f"Bearer {firmware_server.token}"
        assert obs.online[device_id][-1] == "offline"  # graceful stop says so

    run(scenario())


def test_install_stage_directly(mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str) -> None:
    async def scenario() -> None:
        ctx = agent_context(mqtt_broker, profile=HTTP_INSTANT.with_overrides(params={"progress_step": "10"}))
        fw = firmware_ref(firmware_server, "gateway-x1", "1.1.0", device=device_id)
        async with (
            observing(mqtt_broker, device_id) as obs,
            running_agent(ctx, device_id, model="gateway-x1"),
        ):
            await obs.send(device_id, desired(12, 1, "install", fw))
            await obs.wait_state(device_id, "SUCCEEDED")
            states = obs.states(device_id)
            assert [s for s in states if s != "DOWNLOADING"] == ["DOWNLOADED", "VERIFIED", *INSTALL_STATES]
            progress = [r.progress for r in obs.reports[device_id] if r.state.value == "DOWNLOADING"]
            # 1 MB in 64 KiB chunks with a 10 % step: several throttled progress reports, rising.
            assert 4 <= len(progress) <= 11 and progress == sorted(progress) and progress[0] == 0
            assert_seq_increasing(obs, device_id)

    run(scenario())


@pytest.mark.parametrize(
    ("case", "error"),
    [("tampered", "checksum"), ("bad_signature", "signature"), ("wrong_model", "incompatible")],
)
def test_verification_failures_keep_old_version(
    mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str, case: str, error: str
) -> None:
    async def scenario() -> None:
        installer = SimulatedInstaller()
        ctx = agent_context(mqtt_broker, installer=installer)
        if case == "tampered":
            fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id, tampered=True)
        elif case == "bad_signature":
            good = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id)
            other = firmware_ref(firmware_server, "sensor-v2", "1.0.0", device=device_id)
            fw = good.model_copy(update={"signature": other.signature})
        else:
            fw = firmware_ref(firmware_server, "gateway-x1", "1.1.0", device=device_id)
        async with observing(mqtt_broker, device_id) as obs, running_agent(ctx, device_id) as agent:
            await obs.send(device_id, desired(21, 1, "install", fw))
            failed = await obs.wait_state(device_id, "FAILED")
            assert failed.error is not None and failed.error.value == error
            assert failed.running_version == "1.0.0"
            await asyncio.sleep(0.2)
            assert obs.states(device_id)[-1] == "FAILED"
            assert installer.total_installs == 0
            assert agent.running_version == "1.0.0" and agent.slot == "a"
            if case == "tampered":
                assert "DOWNLOADED" in obs.states(device_id)
                assert len(firmware_server.requests_for(device_id)) == 1
            else:
                # Signature and model are checked before any byte is fetched.
                assert firmware_server.requests_for(device_id) == []

    run(scenario())


@pytest.mark.parametrize(
    ("rate", "state", "error"),
    [("boot_failure", "ROLLED_BACK", "boot_failure"), ("install_error", "FAILED", "install_error")],
)
def test_install_failures(
    mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str, rate: str, state: str, error: str
) -> None:
    async def scenario() -> None:
        installer = SimulatedInstaller()
        profile = HTTP_INSTANT.with_overrides(rates={rate: 1.0})
        ctx = agent_context(mqtt_broker, profile=profile, installer=installer)
        fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id)
        async with observing(mqtt_broker, device_id) as obs, running_agent(ctx, device_id) as agent:
            await obs.send(device_id, desired(31, 1, "install", fw))
            final = await obs.wait_state(device_id, state)
            assert final.error is not None and final.error.value == error
            assert final.running_version == "1.0.0"
            assert agent.running_version == "1.0.0" and agent.slot == "a"
            assert installer.installs[(device_id, 31)] == 1
            expected = ["INSTALLING", "REBOOTING", state] if state == "ROLLED_BACK" else ["INSTALLING", state]
            assert obs.states(device_id)[-len(expected) :] == expected

            # A retry of the same update_id is answered, never installed a second time.
            await obs.send(device_id, desired(31, 2, "install", fw))
            await obs.wait_for(lambda: any(r.attempt == 2 for r in obs.reports[device_id]), what="attempt 2")
            again = obs.reports[device_id][-1]
            assert again.state.value == state and again.attempt == 2
            assert installer.installs[(device_id, 31)] == 1

    run(scenario())


def test_kill_mid_download_then_resume(
    mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str, tmp_path: Path
) -> None:
    """A killed agent restarted on the same state dir resumes with Range and installs once."""

    async def scenario() -> None:
        installer = SimulatedInstaller()
        slow = HTTP_INSTANT.with_overrides(params={"bandwidth": str(400 * 1024), "progress_step": "10"})
        fw = firmware_ref(firmware_server, "gateway-x1", "1.0.0", device=device_id)
        size = fw.size
        async with observing(mqtt_broker, device_id) as obs:
            await obs.send(device_id, desired(41, 1, "install", fw))
            ctx1 = agent_context(mqtt_broker, profile=slow, installer=installer)
            async with running_agent(ctx1, device_id, model="gateway-x1", state_dir=tmp_path, stop=False):
                await obs.wait_for(
                    lambda: any(r.progress >= 20 for r in obs.reports.get(device_id, [])), what="20 %"
                )
            await ctx1.aclose()
            await obs.wait_for(lambda: obs.online[device_id][-1] == "offline", what="last will")
            part = next((tmp_path / "images").glob("*.part"))
            kept = part.stat().st_size
            assert 0 < kept < size
            saved = json.loads((tmp_path / "state.json").read_text())
            assert saved["job"]["phase"] == "download" and saved["job"]["update_id"] == 41
            seq_before = max(r.seq for r in obs.reports[device_id])

            ctx2 = agent_context(mqtt_broker, installer=installer)
            async with running_agent(ctx2, device_id, model="gateway-x1", state_dir=tmp_path) as agent:
                final = await obs.wait_state(device_id, "SUCCEEDED")
                assert final.running_version == "1.0.0" == agent.running_version
            await ctx2.aclose()
            reqs = firmware_server.requests_for(device_id)
            assert reqs[0].range is None
            assert reqs[-1].range == f"bytes={kept}-" and reqs[-1].status == 206
            assert installer.installs[(device_id, 41)] == 1
            after = [r for r in obs.reports[device_id] if r.seq > seq_before]
            assert after and all(r.seq > seq_before for r in after)
            assert_seq_increasing(obs, device_id)
            assert obs.states(device_id).count("INSTALLING") == 1
            saved = json.loads((tmp_path / "state.json").read_text())
            assert saved["slot"] == "b" and saved["job"] is None and saved["seq"] == final.seq
            assert not list((tmp_path / "images").glob("*"))  # image removed after success

    run(scenario())


def test_duplicate_delivery_and_restart_never_install_twice(
    mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        installer = SimulatedInstaller()
        fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id)
        doc = desired(51, 1, "install", fw)
        async with observing(mqtt_broker, device_id) as obs:
            ctx = agent_context(mqtt_broker, installer=installer)
            async with running_agent(ctx, device_id, state_dir=tmp_path):
                await obs.send(device_id, doc)
                await obs.send(device_id, doc)
                await obs.wait_state(device_id, "SUCCEEDED")
                await obs.send(device_id, doc)  # after the end: the final report is re-sent
                await obs.wait_for(lambda: obs.states(device_id).count("SUCCEEDED") >= 2, what="re-send")
            # A restarted agent gets the retained document again: still no second install.
            async with running_agent(ctx, device_id, state_dir=tmp_path) as agent:
                await obs.wait_for(lambda: obs.states(device_id).count("SUCCEEDED") >= 3, what="re-send 2")
                assert agent.running_version == "1.1.0"
            await ctx.aclose()
            assert installer.installs[(device_id, 51)] == 1
            assert obs.states(device_id).count("INSTALLING") == 1
            assert_seq_increasing(obs, device_id)
            resent = [r for r in obs.reports[device_id] if r.state.value == "SUCCEEDED"]
            assert {(r.update_id, r.attempt, r.running_version) for r in resent} == {(51, 1, "1.1.0")}

    run(scenario())


def test_attempts(mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str) -> None:
    """Checksum failure then a new attempt; a higher attempt on a verified image answers at once;
    a lower attempt is ignored."""

    async def scenario() -> None:
        installer = SimulatedInstaller()
        ctx = agent_context(mqtt_broker, installer=installer)
        bad = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id, tampered=True)
        good = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id)
        async with observing(mqtt_broker, device_id) as obs, running_agent(ctx, device_id):
            await obs.send(device_id, desired(61, 1, "download", bad))
            await obs.wait_state(device_id, "FAILED")
            await obs.send(device_id, desired(61, 2, "download", good))
            await obs.wait_for(
                lambda: [r.attempt for r in obs.reports[device_id] if r.state.value == "VERIFIED"] == [2],
                what="attempt 2 verified",
            )
            fetched = len(firmware_server.requests_for(device_id))
            assert fetched == 2
            await obs.send(device_id, desired(61, 3, "download", good))
            await obs.wait_for(
                lambda: [r.attempt for r in obs.reports[device_id] if r.state.value == "VERIFIED"] == [2, 3],
                what="attempt 3 verified",
            )
            assert len(firmware_server.requests_for(device_id)) == fetched  # no new download
            count = len(obs.reports[device_id])
            await obs.send(device_id, desired(61, 2, "install", good))  # stale attempt
            await asyncio.sleep(0.3)
            assert len(obs.reports[device_id]) == count and installer.total_installs == 0
            await obs.send(device_id, desired(61, 3, "install", good))
            final = await obs.wait_state(device_id, "SUCCEEDED")
            assert final.attempt == 3 and installer.installs[(device_id, 61)] == 1

    run(scenario())


def test_desired_during_install_is_deferred(
    mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str
) -> None:
    async def scenario() -> None:
        installer = SimulatedInstaller()
        profile = HTTP_INSTANT.with_overrides(params={"install_time": "0.5"})
        ctx = agent_context(mqtt_broker, profile=profile, installer=installer)
        v110 = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id)
        v100 = firmware_ref(firmware_server, "sensor-v2", "1.0.0", device=device_id)
        async with observing(mqtt_broker, device_id) as obs, running_agent(ctx, device_id) as agent:
            await obs.send(device_id, desired(71, 1, "install", v110))
            await obs.wait_state(device_id, "INSTALLING")
            await obs.send(device_id, b"")  # cleared mid-install: must not interrupt it
            await obs.send(device_id, desired(72, 1, "install", v100))  # newest wins, after the install
            await obs.wait_for(
                lambda: (
                    [(r.update_id, r.state.value) for r in obs.reports[device_id]][-1] == (72, "SUCCEEDED")
                ),
                timeout=20,
                what="second update",
            )
            sequence = [(r.update_id, r.state.value) for r in obs.reports[device_id]]
            first_done = sequence.index((71, "SUCCEEDED"))
            assert all(u == 71 for u, _ in sequence[:first_done])
            assert agent.running_version == "1.0.0" and agent.slot == "a"  # b, then back to a
            assert installer.installs == {(device_id, 71): 1, (device_id, 72): 1}

    run(scenario())


def test_restart_during_install_reports_failure(
    mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str, tmp_path: Path
) -> None:
    """An agent that dies while installing finds the phase on restart: FAILED, not a re-install."""

    async def scenario() -> None:
        installer = SimulatedInstaller()
        profile = HTTP_INSTANT.with_overrides(params={"install_time": "30"})
        fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id)
        async with observing(mqtt_broker, device_id) as obs:
            await obs.send(device_id, desired(81, 1, "install", fw))
            ctx = agent_context(mqtt_broker, profile=profile, installer=installer)
            async with running_agent(ctx, device_id, state_dir=tmp_path, stop=False):
                await obs.wait_state(device_id, "INSTALLING")
            async with running_agent(ctx, device_id, state_dir=tmp_path) as agent:
                failed = await obs.wait_state(device_id, "FAILED")
                assert failed.error is not None and failed.error.value == "install_error"
                assert agent.running_version == "1.0.0"
                await asyncio.sleep(0.3)
            await ctx.aclose()
            assert installer.installs[(device_id, 81)] == 1
            assert_seq_increasing(obs, device_id)

    run(scenario())


def test_command_installer(
    mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str, tmp_path: Path
) -> None:
    """--install-cmd drives a real updater: it gets the verified image path; exit code decides."""
    script = tmp_path / "flash.sh"
    log = tmp_path / "flash.log"
    script.write_text(
        f'#!/bin/sh\nsha256sum "$1" > {log}\necho "$FLEET_TARGET_SLOT $FLEET_VERSION" >> {log}\n'
    )
    script.chmod(0o755)

    async def scenario() -> None:
        fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id)
        ctx = AgentContext(
            broker=agent_context(mqtt_broker).broker,
            public_key=agent_context(mqtt_broker).public_key,
            profile=HTTP_INSTANT,
            installer=CommandInstaller(str(script)),
        )
        async with observing(mqtt_broker, device_id) as obs:
            async with running_agent(ctx, device_id, state_dir=tmp_path / "state"):
                await obs.send(device_id, desired(91, 1, "install", fw))
                await obs.wait_state(device_id, "SUCCEEDED")
            lines = log.read_text().split("\n")
            assert lines[0].startswith(fw.sha256) and lines[1] == "b 1.1.0"

            failing = AgentContext(
                broker=ctx.broker,
                public_key=ctx.public_key,
                profile=HTTP_INSTANT,
                installer=CommandInstaller("false"),
            )
            other = device_id + "-2"
            await obs.watch(other)
            fw2 = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=other)
            async with running_agent(failing, other, state_dir=tmp_path / "state2") as agent:
                await obs.send(other, desired(92, 1, "install", fw2))
                failed = await obs.wait_state(other, "FAILED")
                assert failed.error is not None and failed.error.value == "install_error"
                assert agent.running_version == "1.0.0"
            await ctx.aclose()
            await failing.aclose()

    run(scenario())


def test_state_survives_restart_seq_monotonic(mqtt_broker: Any, device_id: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        ctx = agent_context(mqtt_broker)
        store = JsonStateStore(tmp_path, durable=True)
        agent = DeviceAgent(device_id, "sensor-v2", "1.0.0", ctx, store=store)
        agent.state.seq = 41
        store.save(agent.state)
        again = DeviceAgent(device_id, "sensor-v2", "9.9.9", ctx, store=JsonStateStore(tmp_path))
        assert again.state.seq == 41 and again.running_version == "1.0.0"  # the file wins over --version
        await ctx.aclose()

    run(scenario())


def test_agent_command_line(
    mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str, tmp_path: Path
) -> None:
    """``python -m device_sim.agent`` as a real device would run it; SIGTERM ends it cleanly."""
    marker = tmp_path / "installed"
    argv = [
        sys.executable, "-m", "device_sim.agent",
        "--device-id", device_id, "--model", "sensor-v2", "--broker", mqtt_broker.url,
        "--state-dir", str(tmp_path / "state"), "--public-key", str(PUBLIC_KEY_PATH),
        "--install-cmd", f"cp {{image}} {marker}", "--labels", "site=lab", "--log-level", "warning",
    ]  # fmt: skip

    async def scenario() -> None:
        fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id)
        async with observing(mqtt_broker, device_id) as obs:
            proc = subprocess.Popen(argv, cwd=SAMPLES.parent)
            try:
                await obs.wait_for(lambda: obs.online.get(device_id, [])[-1:] == ["online"], what="online")
                assert obs.info[device_id][-1]["labels"] == {"site": "lab"}
                await obs.send(device_id, desired(95, 1, "install", fw))
                final = await obs.wait_state(device_id, "SUCCEEDED", timeout=20)
                assert final.running_version == "1.1.0"
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20)
                assert code == 0
                await obs.wait_for(lambda: obs.online[device_id][-1] == "offline", what="offline")
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert marker.read_bytes() == (SAMPLES / "sensor-v2" / "1.1.0.bin").read_bytes()
        state = json.loads((tmp_path / "state" / "state.json").read_text())
        assert state["running_version"] == "1.1.0" and state["slot"] == "b"

    run(scenario())


def test_a_reconnect_repeats_the_latest_report(
    mqtt_broker: Any, firmware_server: FirmwareServer, device_id: str
) -> None:
    """A broker that crashed may have lost reports it had acknowledged: after every reconnect the agent
    says again where its update stands, with the same seq (an orchestrator that has it ignores it)."""

    async def scenario() -> None:
        ctx = agent_context(mqtt_broker)
        fw = firmware_ref(firmware_server, "sensor-v2", "1.1.0", device=device_id)
        async with observing(mqtt_broker, device_id) as obs, running_agent(ctx, device_id) as agent:
            await obs.send(device_id, desired(21, 1, "install", fw))
            final = await obs.wait_state(device_id, "SUCCEEDED")
            await obs.send(device_id, b"")  # the orchestrator clears the document: nothing retained
            await asyncio.sleep(0.2)
            sent = len(obs.reports[device_id])
            await agent.link.drop(0.5)
            await obs.wait_for(lambda: len(obs.reports[device_id]) > sent, what="the repeated report")
            again = obs.reports[device_id][sent]
            assert (again.state.value, again.seq, again.update_id) == ("SUCCEEDED", final.seq, 21)

    run(scenario())
