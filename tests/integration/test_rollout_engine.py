"""Rollouts end to end: real Redis, broker, Celery worker processes, ingest, API and simulated devices."""

from __future__ import annotations

from collections import Counter

import pytest
import redis

from orchestrator.db import session_scope
from orchestrator.policy import RolloutPolicy
from orchestrator.portal import rollout_summary
from orchestrator.process_metrics import SnapshotCollector
from orchestrator.state_machines import UPDATE_END_STATES
from tests.integration.harness import QUICK_REAL, Harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]
END = {str(s) for s in UPDATE_END_STATES}


def assert_one_end_state_and_full_trail(h: Harness, rollout_id: int) -> None:
    """Every update has exactly one end-state transition, and offered ones a complete trail."""
    events = h.events(rollout_id)
    # server-side transitions and accepted device reports both record the state they lead to
    ends = Counter(
        e.device_update_id for e in events if e.accepted and e.to_state in END and e.device_update_id
    )
    installs = Counter(
        e.device_update_id for e in events if e.kind == "report" and e.name == "INSTALLING" and e.accepted
    )
    for du in h.updates(rollout_id):
        assert str(du.state) in END, (du.id, du.state)
        assert ends[du.id] == 1, (du.id, ends[du.id])
        assert installs[du.id] <= 1, f"update {du.id} installed {installs[du.id]} times"
        if du.offered_at is not None:
            names = [e.name for e in events if e.device_update_id == du.id and e.kind == "transition"]
            assert names[:2] == ["enqueue", "offer"], names


def test_three_wave_rollout_of_200_devices_completes(harness: Harness) -> None:
    # Given 200 simulated devices that really download, verify and reboot
    harness.start_fleet(200, prefix="w3-", profile="instant", params=QUICK_REAL)
    # When a 3-wave rollout runs
    rollout_id = harness.start_rollout("w3-", RolloutPolicy(waves=["1%", "10%", "100%"]))
    harness.wait_status(rollout_id, "COMPLETED", timeout=180)
    # Then every device runs the new version, SQL says so, and so do the retained portal topics
    assert harness.counts(rollout_id) == {"SUCCEEDED": 200}
    assert harness.versions("w3-") == {"1.1.0": 200}
    assert_one_end_state_and_full_trail(harness, rollout_id)
    waves = [e.to_state for e in harness.events(rollout_id) if e.name in ("wave_pass", "wave_fail")]
    assert waves == ["PASSED", "PASSED", "PASSED"]
    with session_scope(harness.database_url) as session:
        summary = rollout_summary(session, rollout_id)
    assert summary is not None
    spans = [(w["started_at"], w["finished_at"]) for w in summary.waves]
    assert all(start is not None and end is not None and start <= end for start, end in spans), spans
    assert [start for start, _ in spans] == sorted(start for start, _ in spans)

    def portal_agrees() -> bool:
        docs = harness.portal_snapshot(rollout_id, wait=0.5)
        summary = docs.get(f"fleet/v1/portal/rollouts/{rollout_id}")
        devices = [d for t, d in docs.items() if "/devices/" in t]
        return (
            summary is not None
            and summary["status"] == "COMPLETED"
            and summary["counts"] == {"SUCCEEDED": 200}
            and len(devices) == 200
            and all(d["state"] == "SUCCEEDED" and d["progress"] == 100 for d in devices)
        )

    assert harness.wait(portal_agrees, 10)

    # and the worker and ingest processes delivered their measurements for /metrics
    def measured() -> dict[str, float]:
        client = redis.Redis.from_url(harness.stack.settings.redis_url)
        totals: Counter[str] = Counter()
        for family in SnapshotCollector(client).collect():
            for sample in family.samples:
                key = sample.name + ("" if "task" not in sample.labels else f":{sample.labels['task']}")
                totals[key] += sample.value
        client.close()
        return totals

    assert harness.wait(lambda: measured()["fleet_reports_applied_total"] >= 200 * 4, 10)
    totals = measured()
    assert totals["fleet_tasks_total:fleet.install"] >= 1
    assert totals["fleet_task_seconds_count:fleet.finalize"] >= 1
    assert totals["fleet_report_to_portal_seconds_count"] >= 200


SLOW = {**QUICK_REAL, "install_time": "0.8:1.5"}


def test_failures_above_the_threshold_halt_the_rollout(harness: Harness) -> None:
    # Given devices of which about half fail their install, and one attempt each
    harness.start_fleet(100, prefix="halt-", profile="instant", fail_rates={"install_error": 0.5}, seed=3)
    policy = RolloutPolicy(
        waves=["20%", "100%"], max_attempts=1, failure_threshold_percent=20, success_threshold=0.5
    )
    # When the rollout runs
    rollout_id = harness.start_rollout("halt-", policy)
    assert harness.wait_status(rollout_id, "HALTED", timeout=120) == "HALTED"
    assert harness.wait(lambda: harness.settled(rollout_id), 60)
    # Then the devices that started finished, and the rest were never offered anything
    updates = harness.updates(rollout_id)
    started = [u for u in updates if u.offered_at is not None]
    untouched = [u for u in updates if u.offered_at is None]
    assert started and untouched
    assert all(str(u.state) in ("SUCCEEDED", "FAILED") for u in started)
    assert all(str(u.state) == "CANCELED" for u in untouched)
    untouched_ids = {u.device_id for u in untouched}
    offered = {e.device_id for e in harness.events(rollout_id) if e.name == "offer"}
    assert not offered & untouched_ids
    assert_one_end_state_and_full_trail(harness, rollout_id)


def test_pause_lets_started_devices_finish_and_resume_completes(harness: Harness) -> None:
    from orchestrator.db import session_scope
    from orchestrator.services import rollout_service

    harness.start_fleet(40, prefix="pause-", profile="instant", params=SLOW)
    rollout_id = harness.start_rollout("pause-", RolloutPolicy(waves=["100%"], max_in_flight=5))
    assert harness.wait(lambda: harness.counts(rollout_id).get("SUCCEEDED", 0) >= 5, 60)
    # When the operator pauses
    with session_scope(harness.database_url) as s:
        rollout_service.pause_rollout(s, rollout_id, actor="test")
    # Then the devices in flight finish and no new device starts
    assert harness.wait(lambda: harness.in_flight(rollout_id) == 0, 60)
    offered_at_pause = sum(1 for u in harness.updates(rollout_id) if u.offered_at is not None)
    assert offered_at_pause < 40
    harness.wait(lambda: False, 3)
    assert sum(1 for u in harness.updates(rollout_id) if u.offered_at is not None) == offered_at_pause
    assert harness.status(rollout_id) == "PAUSED"
    # When resumed, it completes
    with session_scope(harness.database_url) as s:
        rollout_service.resume_rollout(s, rollout_id, actor="test")
    harness.wait_status(rollout_id, "COMPLETED", timeout=120)
    assert harness.counts(rollout_id) == {"SUCCEEDED": 40}
    assert_one_end_state_and_full_trail(harness, rollout_id)


def test_abort_cancels_waiting_devices_and_lets_started_ones_finish(harness: Harness) -> None:
    from orchestrator.db import session_scope
    from orchestrator.errors import IllegalTransition
    from orchestrator.services import rollout_service

    harness.start_fleet(40, prefix="abort-", profile="instant", params=SLOW)
    rollout_id = harness.start_rollout("abort-", RolloutPolicy(waves=["100%"], max_in_flight=5))
    assert harness.wait(lambda: harness.counts(rollout_id).get("SUCCEEDED", 0) >= 3, 60)
    with session_scope(harness.database_url) as s:
        rollout_service.abort_rollout(s, rollout_id, actor="test")
    assert harness.wait(lambda: harness.settled(rollout_id), 60)
    counts = harness.counts(rollout_id)
    assert set(counts) == {"SUCCEEDED", "CANCELED"}, counts
    assert all(u.offered_at is None for u in harness.updates(rollout_id) if str(u.state) == "CANCELED")
    assert harness.status(rollout_id) == "ABORTED"
    with session_scope(harness.database_url) as s, pytest.raises(IllegalTransition):
        rollout_service.resume_rollout(s, rollout_id, actor="test")
    assert_one_end_state_and_full_trail(harness, rollout_id)


def test_stage_timeout_and_retry(harness: Harness) -> None:
    # Given some devices that never answer and some whose first install attempts fail
    harness.start_fleet(
        30, prefix="retry-", profile="instant", fail_rates={"silent": 0.2, "corrupt": 0.3}, seed=11
    )
    policy = RolloutPolicy(
        waves=["100%"], max_attempts=3, retry_backoff_s=0.2, download_timeout_s=3, success_threshold=0.1
    )
    rollout_id = harness.start_rollout("retry-", policy)
    harness.wait_status(rollout_id, "COMPLETED", timeout=120)
    updates = harness.updates(rollout_id)
    timed_out = [u for u in updates if str(u.state) == "TIMED_OUT"]
    retried_ok = [u for u in updates if str(u.state) == "SUCCEEDED" and u.attempt > 1]
    # Then silent devices time out after every attempt, and corrupted downloads were retried
    assert timed_out and all(u.attempt == 3 and u.error_code == "timeout" for u in timed_out)
    assert retried_ok, [(u.device_id, str(u.state), u.attempt, u.error_code) for u in updates]
    names = Counter(e.name for e in harness.events(rollout_id))
    assert names["timeout_retry"] >= 2 * len(timed_out)
    assert names["report_failed_retry"] >= 1 or names["FAILED"] >= 1
    assert_one_end_state_and_full_trail(harness, rollout_id)


def test_worker_sigkill_mid_rollout_loses_nothing(harness: Harness) -> None:
    # Given a rollout in progress
    harness.start_fleet(
        80, prefix="crash-", profile="instant", params={**QUICK_REAL, "install_time": "0.2:0.6"}
    )
    rollout_id = harness.start_rollout("crash-", RolloutPolicy(waves=["100%"], max_in_flight=20))
    assert harness.wait(lambda: harness.counts(rollout_id).get("SUCCEEDED", 0) >= 10, 60)
    # When the worker and its pool are killed outright, and a new one starts later
    worker = next(n for n in harness.stack.processes if n.startswith("worker"))
    harness.stack.kill(worker)
    done_at_kill = harness.counts(rollout_id).get("SUCCEEDED", 0)
    assert done_at_kill < 80
    harness.wait(lambda: False, 2)
    harness.stack.start_worker()
    # Then the rollout completes with exactly one end state and one install per device
    harness.wait_status(rollout_id, "COMPLETED", timeout=180)
    assert harness.counts(rollout_id) == {"SUCCEEDED": 80}
    assert harness.versions("crash-") == {"1.1.0": 80}
    assert_one_end_state_and_full_trail(harness, rollout_id)
