"""Devices running the unmodified AWS IoT Device SDK update through fleet next to fleet's own agents."""

from __future__ import annotations

import pytest

from orchestrator.policy import RolloutPolicy
from tests.integration.harness import QUICK_REAL, Harness


def test_a_mixed_fleet_updates_through_both_protocols(harness: Harness) -> None:
    if harness.broker_kind == "amqtt":
        pytest.skip("amqtt 0.12 refuses client publishes to $aws/... topics (Mosquitto carries them)")
    # Given 10 fleet agents, 10 AWS SDK devices, and one more AWS device whose downloads arrive corrupt
    harness.start_fleet(10, prefix="mix-f-", params=QUICK_REAL)
    harness.start_fleet(10, prefix="mix-a-", params=QUICK_REAL, protocol="aws-jobs")
    harness.start_fleet(
        1, prefix="mix-x-", params=QUICK_REAL, protocol="aws-jobs", fail_rates={"corrupt": 1.0}
    )
    # When one rollout targets all 21, one attempt each
    rollout_id = harness.start_rollout(
        "mix-", RolloutPolicy(waves=["100%"], max_attempts=1, success_threshold=0.9)
    )
    harness.wait_status(rollout_id, "COMPLETED", "HALTED", timeout=120)
    # Then both kinds succeed, and the failing AWS device ends FAILED with its reason
    rows = {u.device_id: u for u in harness.updates(rollout_id)}
    assert harness.status(rollout_id) == "COMPLETED"
    assert {d: str(u.state) for d, u in rows.items() if str(u.state) != "SUCCEEDED"} == {
        "mix-x-00000": "FAILED"
    }
    assert rows["mix-x-00000"].error_code == "checksum"
    assert harness.versions("mix-f-") == {"1.1.0": 10} and harness.versions("mix-a-") == {"1.1.0": 10}
    # and the trail shows the AWS devices' stages as reports like any other
    names = {
        e.name for e in harness.events(rollout_id) if e.device_id == "mix-a-00003" and e.kind == "report"
    }
    assert {"DOWNLOADING", "VERIFIED", "INSTALLING", "REBOOTING", "SUCCEEDED"} <= names

    # and the portal topics show the same end states for both kinds
    def portal_agrees() -> bool:
        docs = harness.portal_snapshot(rollout_id, wait=0.5)
        devices = {t.rsplit("/", 1)[1]: d["state"] for t, d in docs.items() if "/devices/" in t}
        return devices == {d: str(u.state) for d, u in rows.items()}

    assert harness.wait(portal_agrees, 10)
