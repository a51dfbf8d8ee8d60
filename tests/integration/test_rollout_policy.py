"""Rollout policy end to end: real Redis, broker, Celery workers, ingest and simulated devices.

A maintenance window with a rate ramp, offline devices with an end time, and a continuous rollout
that takes in devices registering after it started.
"""

from __future__ import annotations

import subprocess
from datetime import timedelta

import pytest
from sqlalchemy import select

from orchestrator.db import session_scope
from orchestrator.models import Device, Event, utcnow
from orchestrator.policy import RateRamp, RolloutPolicy, Target
from orchestrator.services import rollout_service
from orchestrator.services.rollout_planner import create_rollout
from tests.integration.harness import QUICK_REAL, Harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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


def test_installs_wait_for_the_window_and_offers_follow_the_rate_ramp(harness: Harness) -> None:
    # Given 12 devices, a window opening in 8 s, and 4 offers a minute doubling per 4 successes
    harness.start_fleet(12, prefix="win-", profile="instant", params=QUICK_REAL)
    opens = utcnow() + timedelta(seconds=8)
    ramp = RateRamp(initial_per_minute=4, factor=2, every_succeeded=4, max_per_minute=60)
    policy = RolloutPolicy(
        waves=["100%"],
        install_timeout_s=30,
        windows=[{"start": opens, "end": opens + timedelta(minutes=5)}],
        rate=ramp,
    )
    # When the rollout runs
    rollout_id = _start(harness, Target(model="sensor-v2"), policy)
    harness.wait_status(rollout_id, "COMPLETED", timeout=120)
    # Then every device updated, and none began installing before the window opened
    assert harness.counts(rollout_id) == {"SUCCEEDED": 12}
    assert harness.versions("win-") == {"1.1.0": 12}
    events = harness.events(rollout_id)
    installs = [e for e in events if e.kind == "report" and e.name == "INSTALLING" and e.accepted]
    assert len(installs) == 12 and min(e.created_at for e in installs) >= opens
    verified = [e for e in events if e.kind == "report" and e.name == "VERIFIED" and e.accepted]
    assert min(e.created_at for e in verified) < opens  # downloads did not wait for the window
    # and no offer exceeded the rate the ramp allowed at its time
    offers = sorted(e.created_at for e in events if e.name == "offer")
    successes = sorted(e.created_at for e in events if e.to_state == "SUCCEEDED")
    assert len(offers) == 12
    for at in offers:
        succeeded = sum(1 for s in successes if s <= at)
        in_minute = sum(1 for o in offers if at - timedelta(minutes=1) < o <= at)
        assert in_minute <= ramp.per_minute(succeeded, 0), (at, in_minute, succeeded)
    assert sum(1 for o in offers if o <= offers[0] + timedelta(seconds=5)) == 4


def test_offline_devices_wait_without_a_slot_and_are_skipped_at_the_end(harness: Harness) -> None:
    # Given 6 devices online, and 5 that registered and went offline
    harness.start_fleet(6, prefix="on-", profile="instant", params=QUICK_REAL)
    away = harness.start_fleet(3, prefix="away-", profile="instant", params=QUICK_REAL, seed=2)
    back = harness.start_fleet(2, prefix="back-", profile="instant", params=QUICK_REAL, seed=3)
    _stop(away)
    _stop(back)
    assert harness.wait(lambda: _online(harness, "away-") + _online(harness, "back-") == 0, 30)
    # When a rollout with 3 slots and an end time 25 s away starts
    end = utcnow() + timedelta(seconds=25)
    policy = RolloutPolicy(waves=["100%"], max_in_flight=3, end_at=end, failure_threshold_count=1)
    rollout_id = _start(harness, Target(model="sensor-v2"), policy)
    # Then the online devices update although five offline ones are queued ahead of slots
    assert harness.wait(lambda: harness.counts(rollout_id).get("SUCCEEDED", 0) == 6, 60)
    assert harness.counts(rollout_id) == {"SUCCEEDED": 6, "QUEUED": 5}
    # When two of them come back before the end, they are offered and update
    harness.start_fleet(2, prefix="back-", profile="instant", params=QUICK_REAL, seed=3)
    assert harness.wait(lambda: harness.counts(rollout_id).get("SUCCEEDED", 0) == 8, 60)
    # Then at the end the three still offline are SKIPPED (offline) and the rollout completes
    harness.wait_status(rollout_id, "COMPLETED", timeout=60)
    assert utcnow() >= end
    assert harness.counts(rollout_id) == {"SUCCEEDED": 8, "SKIPPED": 3}
    skipped = {u.device_id: u.error_code for u in harness.updates(rollout_id) if u.error_code}
    assert skipped == {f"away-{i:05d}": "offline" for i in range(3)}
    assert harness.versions("back-") == {"1.1.0": 2} and harness.versions("away-") == {"1.0.0": 3}
    summary = harness.portal_snapshot(rollout_id).get(f"fleet/v1/portal/rollouts/{rollout_id}")
    assert summary is not None and summary["skipped"] == {"offline": 3}


def test_a_continuous_rollout_updates_devices_that_register_later(harness: Harness) -> None:
    # Given four devices and a continuous rollout for their model, ending in 30 s
    harness.start_fleet(4, prefix="first-", profile="instant", params=QUICK_REAL)
    end = utcnow() + timedelta(seconds=30)
    policy = RolloutPolicy(waves=["50%", "100%"], continuous=True, end_at=end)
    rollout_id = _start(harness, Target(model="sensor-v2"), policy)
    assert harness.wait(lambda: harness.counts(rollout_id).get("SUCCEEDED", 0) == 4, 60)
    assert harness.status(rollout_id) == "RUNNING"  # open for more
    # When three new devices register
    harness.start_fleet(3, prefix="later-", profile="instant", params=QUICK_REAL, seed=5)
    # Then they join the last wave and update, and the rollout completes at its end time
    harness.wait_status(rollout_id, "COMPLETED", timeout=90)
    assert utcnow() >= end
    assert harness.counts(rollout_id) == {"SUCCEEDED": 7}
    assert harness.versions("later-") == {"1.1.0": 3}
    joined = [e for e in harness.events(rollout_id) if e.name == "devices_joined"]
    assert sum(e.detail["devices"] for e in joined if e.detail) == 3
    assert all(isinstance(e, Event) and e.wave_id is not None for e in joined)
    waves = [e.to_state for e in harness.events(rollout_id) if e.name in ("wave_pass", "wave_fail")]
    assert waves == ["PASSED", "PASSED"]


def test_a_soak_rolls_back_devices_that_turn_unhealthy_after_the_update(harness: Harness) -> None:
    # Given six devices that stay healthy and three whose application fails after any update
    harness.start_fleet(6, prefix="fine-", profile="instant", params=QUICK_REAL)
    harness.start_fleet(
        3, prefix="sick-", profile="instant", params=QUICK_REAL, fail_rates={"unhealthy": 1.0}
    )
    # When a rollout soaks each device for 5 s with heartbeats every half second
    soak = {"duration_s": 5, "heartbeat_s": 0.5, "missed_heartbeats": 4}
    policy = RolloutPolicy(waves=["100%"], soak=soak, success_threshold=0.6)
    rollout_id = _start(harness, Target(model="sensor-v2"), policy)

    def soaking_on_the_portal() -> bool:
        docs = harness.portal_snapshot(rollout_id, wait=0.3)
        summary = docs.get(f"fleet/v1/portal/rollouts/{rollout_id}") or {}
        return summary.get("counts", {}).get("SOAKING", 0) > 0

    assert harness.wait(soaking_on_the_portal, 30)
    harness.wait_status(rollout_id, "COMPLETED", timeout=90)
    # Then the healthy devices succeeded after their soak, and the unhealthy ones went back
    assert harness.counts(rollout_id) == {"SUCCEEDED": 6, "ROLLED_BACK": 3}
    assert harness.versions("fine-") == {"1.1.0": 6}
    assert harness.wait(lambda: harness.versions("sick-") == {"1.0.0": 3}, 10)
    updates = harness.updates(rollout_id)
    assert {u.error_code for u in updates if u.state == "ROLLED_BACK"} == {"health"}
    events = harness.events(rollout_id)
    for u in updates:
        mine = [e for e in events if e.device_update_id == u.id]
        soaked = next(e.created_at for e in mine if e.to_state == "SOAKING")
        if u.state == "SUCCEEDED":
            passed = next(e.created_at for e in mine if e.name == "soak_passed")
            assert (passed - soaked).total_seconds() >= 5
            beats = [e for e in mine if e.kind == "report" and e.detail and "health" in e.detail]
            assert len(beats) >= 5 and all(e.detail["health"]["app_healthy"] for e in beats)
        else:
            moves = [e.to_state for e in mine if e.accepted and e.to_state]
            assert moves[-2:] == ["ROLLING_BACK", "ROLLED_BACK"], moves
    waves = [e.to_state for e in events if e.name in ("wave_pass", "wave_fail")]
    assert waves == ["PASSED"]
