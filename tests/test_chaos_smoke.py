"""The chaos command in its small version: every fault of the schedule, nothing lost or done twice.

Runs ``benchmarks/chaos.py --quick --no-baseline`` (100 devices, a fault every few seconds: worker
SIGKILL x3, broker restart, Redis restart with and without its data, API and ingest restarts) and
checks its verdict. Times are printed by the command, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.embedded import find_mosquitto
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.mark.timeout(420)
def test_quick_chaos_run_loses_nothing(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        unavailable("the chaos run needs Mosquitto >= 2.0 (its persistence)")
    output = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/chaos.py", "--quick", "--no-baseline", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert output.exists(), f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    chaos = json.loads(output.read_text())["chaos"]
    assert "error" not in chaos, chaos.get("traceback")
    assert chaos["faults_not_injected"] == [], chaos["faults"]
    assert {f["name"] for f in chaos["faults"]} >= {"worker SIGKILL 3", "broker restart", "ingest restart"}
    assert chaos["status"] == "COMPLETED" and chaos["all_succeeded"], chaos["end_states"]
    assert chaos["double_installs"] == 0, chaos["installs_per_device"]
    assert chaos["reports_lost"] == 0 and chaos["reports_sent"] > 0
    assert chaos["second_attempts"] == 0
    assert chaos["processes_exited_on_their_own"] == []
    assert done.returncode == 0, done.stdout[-4000:]
