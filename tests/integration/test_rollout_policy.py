"""Rollout policy end to end: real Redis, broker, Celery workers, ingest and simulated devices.

Two rollouts, each exercising several policies at once (a stack costs seconds to start):
a paced one (maintenance window, rate ramp, health-gated soak) and an open one (continuous, with
offline devices and an end time). Each policy is also tested step by step, on PostgreSQL as well,
in test_policy_steps.py; these run on the embedded servers only.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator.db import session_scope
from orchestrator.models import Device, utcnow
from orchestrator.policy import RateRamp, RolloutPolicy, Target
from orchestrator.services import rollout_service
from orchestrator.services.rollout_planner import create_rollout
from tests.integration.harness import QUICK_REAL, Harness, running_harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def stack(tmp_path: Path, database_url: str, redis_url: str, mqtt_broker: Any) -> Iterator[Harness]:
    if not database_url.startswith("sqlite") or mqtt_broker.kind == "external":
        pytest.skip("runs on [sqlite-embedded]; the steps are tested on PostgreSQL in test_policy_steps.py")
    with running_harness(tmp_path / "stack", database_url, redis_url, mqtt_broker) as h:
        yield h


def _start(h: Harness, target: Target, policy: RolloutPolicy) -> int:
    firmware_id = h.add_sample_firmware()
    with session_scope(h.database_url) as s:
        rollout = create_rollout(s, name="policy", firmware_id=firmware_id, target=target, policy=policy)
        s.commit()
        rollout_service.start_rollout(s, rollout.id, actor="test")
        return rollout.id


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(20)


def _online(h: Harness, prefix: str) -> int:
    with session_scope(h.database_url) as s:
        return len(s.scalars(select(Device.id).where(Device.id.startswith(prefix), Device.online)).all())


def test_a_paced_rollout_waits_for_its_window_follows_its_rate_and_soaks(stack: Harness) -> None:
    h = stack
    # Given 8 devices that stay healthy and 3 whose application fails after any update
    h.start_fleet(8, prefix="fine-", profile="instant", params=QUICK_REAL)
    h.start_fleet(
        3, prefix="sick-", profile="instant", params=QUICK_REAL, fail_rates={"unhealthy": 1.0}, seed=4
    )
    # When a rollout installs only in a window opening in 6 s, offers 4 a minute doubling per
    # 4 successes, and soaks each device 4 s with heartbeats every half second
    opens = utcnow() + timedelta(seconds=6)
    ramp = RateRamp(initial_per_minute=4, factor=2, every_succeeded=4, max_per_minute=60)
    policy = RolloutPolicy(
        waves=["100%"],
        install_timeout_s=30,
        windows=[{"start": opens, "end": opens + timedelta(minutes=5)}],
        rate=ramp,
        soak={"duration_s": 4, "heartbeat_s": 0.5, "missed_heartbeats": 4},
        success_threshold=0.6,
    )
    rollout_id = _start(h, Target(model="sensor-v2"), policy)

    def soaking_on_the_portal() -> bool:
        summary = h.portal_snapshot(rollout_id, wait=0.3).get(f"fleet/v1/portal/rollouts/{rollout_id}") or {}
        return summary.get("counts", {}).get("SOAKING", 0) > 0

    assert h.wait(soaking_on_the_portal, 40)
    h.wait_status(rollout_id, "COMPLETED", timeout=120)
    # Then the healthy devices run the new version and the unhealthy ones went back to the old one
    assert h.counts(rollout_id) == {"SUCCEEDED": 8, "ROLLED_BACK": 3}
    assert h.versions("fine-") == {"1.1.0": 8}
    assert h.wait(lambda: h.versions("sick-") == {"1.0.0": 3}, 10)
    events = h.events(rollout_id)
    updates = h.updates(rollout_id)
    assert {u.error_code for u in updates if u.state == "ROLLED_BACK"} == {"health"}
    assert [e.to_state for e in events if e.name in ("wave_pass", "wave_fail")] == ["PASSED"]
    # and nothing began installing before the window opened, though downloads did not wait for it
    reports = [e for e in events if e.kind == "report" and e.accepted]
    installs = [e.created_at for e in reports if e.name == "INSTALLING"]
    assert len(installs) == 11 and min(installs) >= opens
    assert min(e.created_at for e in reports if e.name == "VERIFIED") < opens
    # and no offer exceeded the rate the ramp allowed at its time (successes count after the soak)
    offers = sorted(e.created_at for e in events if e.name == "offer")
    successes = sorted(e.created_at for e in events if e.to_state == "SUCCEEDED")
    assert len(offers) == 11
    for at in offers:
        in_minute = sum(1 for o in offers if at - timedelta(minutes=1) < o <= at)
        assert in_minute <= ramp.per_minute(sum(1 for s in successes if s <= at), 0), at
    assert sum(1 for o in offers if o <= offers[0] + timedelta(seconds=5)) == 4
    # and each success came after a soak of healthy heartbeats, each rollback after an unhealthy one
    for u in updates:
        mine = [e for e in events if e.device_update_id == u.id]
        soaked = next(e.created_at for e in mine if e.to_state == "SOAKING")
        beats = [e.detail["health"] for e in mine if e.kind == "report" and e.detail and "health" in e.detail]
        if u.state == "SUCCEEDED":
            passed = next(e.created_at for e in mine if e.name == "soak_passed")
            assert (passed - soaked).total_seconds() >= 4
            assert len(beats) >= 4 and all(b["app_healthy"] for b in beats)
        else:
            assert beats and not beats[-1]["app_healthy"]
            moves = [e.to_state for e in mine if e.accepted and e.to_state]
            assert moves[-2:] == ["ROLLING_BACK", "ROLLED_BACK"], moves


def test_an_open_rollout_takes_in_late_devices_waits_for_offline_ones_and_ends_on_time(
    stack: Harness,
) -> None:
    h = stack
    # Given 4 devices online, and 5 that registered and went offline
    h.start_fleet(4, prefix="on-", profile="instant", params=QUICK_REAL)
    away = h.start_fleet(3, prefix="away-", profile="instant", params=QUICK_REAL, seed=2)
    back = h.start_fleet(2, prefix="back-", profile="instant", params=QUICK_REAL, seed=3)
    _stop(away)
    _stop(back)
    assert h.wait(lambda: _online(h, "away-") + _online(h, "back-") == 0, 30)
    # When a continuous rollout with 2 slots and an end time 20 s away starts
    end = utcnow() + timedelta(seconds=20)
    policy = RolloutPolicy(
        waves=["100%"], max_in_flight=2, continuous=True, end_at=end, failure_threshold_count=1
    )
    rollout_id = _start(h, Target(model="sensor-v2"), policy)
    # Then the online devices update although offline ones are queued ahead of the slots
    assert h.wait(lambda: h.counts(rollout_id).get("SUCCEEDED", 0) == 4, 60)
    assert h.counts(rollout_id).get("QUEUED", 0) == 5
    assert h.status(rollout_id) == "RUNNING"
    # When two offline devices come back and three new ones register
    h.start_fleet(2, prefix="back-", profile="instant", params=QUICK_REAL, seed=3)
    h.start_fleet(3, prefix="late-", profile="instant", params=QUICK_REAL, seed=5)
    # Then they are offered and update; at the end the ones still away are SKIPPED (offline)
    h.wait_status(rollout_id, "COMPLETED", timeout=90)
    assert utcnow() >= end
    assert h.counts(rollout_id) == {"SUCCEEDED": 9, "SKIPPED": 3}
    skipped = {u.device_id: u.error_code for u in h.updates(rollout_id) if u.state == "SKIPPED"}
    assert skipped == {f"away-{i:05d}": "offline" for i in range(3)}
    assert h.versions("back-") == {"1.1.0": 2} and h.versions("late-") == {"1.1.0": 3}
    assert h.versions("away-") == {"1.0.0": 3}
    events = h.events(rollout_id)
    joined = [e for e in events if e.name == "devices_joined"]
    assert sum(e.detail["devices"] for e in joined if e.detail) == 3
    assert [e.to_state for e in events if e.name in ("wave_pass", "wave_fail")] == ["PASSED"]
    summary = h.portal_snapshot(rollout_id).get(f"fleet/v1/portal/rollouts/{rollout_id}")
    assert summary is not None and summary["skipped"] == {"offline": 3}
