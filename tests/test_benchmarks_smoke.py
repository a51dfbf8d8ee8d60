"""Smoke test of benchmarks/rollout_throughput.py: a quick zero-delay run ends and writes its JSON.

It checks the shape of the output only; timings depend on the machine and are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.embedded import find_mosquitto

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "rollout_throughput.py"

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.mark.timeout(600)
def test_quick_zero_delay_run_writes_results(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("the benchmark needs Mosquitto >= 2.0 on PATH")
    output = tmp_path / "rollout_throughput.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--scenario", "zero-delay", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"

    report = json.loads(output.read_text())
    assert {"meta", "targets", "scenarios", "ratios", "target_checks"} <= report.keys()
    assert report["meta"]["machine"]["cpus"] >= 1
    (entry,) = report["scenarios"]["zero_delay"]
    assert entry["devices"] == 200
    (run,) = entry["runs"]
    assert "error" not in run, run.get("traceback")
    assert run["completed"] is True
    assert run["status"] == "COMPLETED"
    assert run["succeeded"] == 200
    for key in (
        "wall_s",
        "devices_per_s",
        "cpu_ms_per_device",
        "cpu_by_role",
        "peak_rss_total_mib",
        "celery_tasks",
        "portal_latency",
        "ingest",
        "create_rollout_s",
    ):
        assert key in run, key
    roles = {"worker1", "ingest", "api", "beat", "redis", "mosquitto", "simulator"}
    assert roles <= run["cpu_by_role"].keys()
    # the steps ran (batched: far fewer tasks than devices)
    assert {"fleet.install", "fleet.finalize"} <= run["celery_tasks"]["by_name"].keys()
    assert run["portal_latency"]["matched"] > 0
    assert set(entry["median"]) >= {"wall_s", "devices_per_s", "cpu_ms_per_device"}
