"""The operator CLI against the full stack: upload, roll out, steer, watch, inspect."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.cli.watch import watch_rollout_portal
from orchestrator.services.token_service import Role
from tests.cli.conftest import make_token, run_cli
from tests.integration.harness import QUICK_REAL, SAMPLES, Harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# Installs take a moment, so the rollout is still running when it is paused.
STEADY = {**QUICK_REAL, "install_time": "0.4:0.8"}


def test_operator_rolls_out_firmware_through_the_cli(harness: Harness, tmp_path: Path) -> None:
    token = make_token(harness.database_url, Role.OPERATOR)
    api = harness.stack.api_url

    def cli(*args: str) -> str:
        result = run_cli(
            *args, api_url=api, token=token, cwd=tmp_path, env={"FLEET_MQTT_URL": harness.broker_url}
        )
        assert result.returncode == 0, f"fleet {' '.join(args)}:\n{result.output}"
        return result.stdout

    harness.start_fleet(20, prefix="cli-", params=STEADY)

    # Upload the signed sample image
    signature = json.loads((SAMPLES / "sensor-v2" / "1.1.0.json").read_text())["signature"]
    image = str(SAMPLES / "sensor-v2" / "1.1.0.bin")
    added = cli(
        "firmware", "add", image, "--model", "sensor-v2", "--version", "1.1.0", "--signature", signature
    )
    match = re.search(r"firmware (\d+): sensor-v2 1\.1\.0", added)
    assert match, added
    firmware_id = match.group(1)
    assert "1.1.0" in cli("firmware", "list")

    # A rollout scheduled for later can be aborted before it starts
    later = cli(
        "rollout",
        "create",
        "--firmware",
        firmware_id,
        "--model",
        "sensor-v2",
        "--start-at",
        "2099-01-01T00:00:00Z",
    )
    scheduled_id = re.search(r"rollout (\d+) SCHEDULED: 20 devices", later)
    assert scheduled_id, later
    assert "ABORTED" in cli("rollout", "abort", scheduled_id.group(1))

    # Create a rollout in two waves, then pause and resume it
    created = cli(
        *("rollout", "create", "--firmware", firmware_id, "--model", "sensor-v2", "--waves", "10%,100%"),
        *("--success-threshold", "0.9", "--failure-threshold-percent", "50"),
        *("--max-in-flight", "5", "--max-attempts", "2"),
    )
    match = re.search(r"rollout (\d+) RUNNING: 20 devices", created)
    assert match, created
    rollout_id = match.group(1)
    assert "PAUSED" in cli("rollout", "pause", rollout_id)
    assert json.loads(cli("rollout", "status", rollout_id, "--json"))["status"] == "PAUSED"
    assert "RUNNING" in cli("rollout", "resume", rollout_id)

    # Watch it to the end from the portal topics
    screen = Console(record=True, force_terminal=True, width=120, color_system=None)
    status = watch_rollout_portal(harness.broker_url, int(rollout_id), timeout=120, console=screen)
    assert status == "COMPLETED"
    rendered = screen.export_text()
    assert "wave 0" in rendered and "wave 1" in rendered
    assert "all devices" in rendered and "20/20" in rendered and "100.0%" in rendered
    assert "SUCCEEDED" in rendered and "COMPLETED" in rendered

    # The command does the same, and for a finished rollout just prints the final tables
    watched = cli("rollout", "watch", rollout_id, "--timeout", "30")
    assert "COMPLETED" in watched and "SUCCEEDED" in watched

    # Status, listing and inventory agree
    detail = cli("rollout", "status", rollout_id)
    assert "COMPLETED" in detail and "100.0% done" in detail
    listing = cli("rollout", "list")
    assert re.search(rf"│ {rollout_id}\s+│.*COMPLETED", listing), listing
    assert re.search(rf"│ {scheduled_id.group(1)}\s+│.*ABORTED", listing), listing
    devices = cli("devices", "list", "--model", "sensor-v2", "--limit", "5")
    assert "5 devices shown" in devices and devices.count("1.1.0") == 5

    # An action the status does not allow: the server's reason, non-zero exit
    refused = run_cli("rollout", "abort", rollout_id, api_url=api, token=token, cwd=tmp_path)
    assert refused.returncode != 0
    assert "COMPLETED" in refused.stderr and "Traceback" not in refused.output
