"""Per-device actions on real SQL, Redis and broker: retry a failure, cancel before the offer, stop
before the install; and, end to end with simulated devices, a stop that the device obeys."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from orchestrator.db import session_scope
from orchestrator.engine import reconciler, steps, waves
from orchestrator.engine.client import send_stage
from orchestrator.engine.runtime import Runtime
from orchestrator.errors import Conflict
from orchestrator.models import DeviceUpdate, utcnow
from orchestrator.policy import RolloutPolicy
from orchestrator.protocol import ErrorCode, ReportState
from orchestrator.services import device_actions
from orchestrator.state_machines import UpdateState
from tests.integration.engine_kit import (
    Retained,
    counts,
    plan_rollout,
    queued_messages,
    report,
    target_version,
    updates,
)
from tests.integration.harness import QUICK_REAL, Harness, running_harness

pytestmark = [pytest.mark.integration]


def _row(rt: Runtime, update_id: int) -> DeviceUpdate:
    with rt.sessions() as session:
        return session.get_one(DeviceUpdate, update_id)


def test_retry_cancel_and_stop_move_only_the_updates_they_may(rt: Runtime, mqtt_broker: Any) -> None:
    # Given five devices, two slots, one attempt each
    policy = RolloutPolicy(waves=["100%"], max_in_flight=2, max_attempts=1)
    rollout_id, prefix = plan_rollout(rt, 5, policy)
    retained = Retained(mqtt_broker, prefix)
    try:
        waves.kick(rt, rollout_id)
        failing, downloading = updates(rt, rollout_id, UpdateState.OFFERED)
        queued = updates(rt, rollout_id, UpdateState.QUEUED)
        # When one download fails for good, and an operator retries it
        report(rt, [failing], ReportState.FAILED, error=ErrorCode.CHECKSUM)
        steps.finalize(rt, [failing.id])
        with rt.sessions() as session:
            again = device_actions.retry_update(session, rollout_id, failing.device_id, actor="api:ops")
        # Then it is queued as attempt 2 and offered again through admission
        assert (again.state, again.attempt, again.finalized_at) == (UpdateState.QUEUED, 2, None)
        # When a queued one is canceled, it ends at once; a second cancel is refused
        with rt.sessions() as session:
            canceled = device_actions.cancel_update(session, rollout_id, queued[-1].device_id)
            assert canceled.state == UpdateState.CANCELED and canceled.error_code == "canceled"
            with pytest.raises(Conflict, match="only updates not offered yet"):
                device_actions.cancel_update(session, rollout_id, queued[-1].device_id)
        # When the downloading one is asked to stop, its document becomes stage cancel, never install
        report(rt, [downloading], ReportState.DOWNLOADING, ReportState.VERIFIED)
        with rt.sessions() as session:
            stopping = device_actions.request_stop(
                session, rollout_id, downloading.device_id, actor="api:ops"
            )
        assert stopping.stop_requested_at is not None
        assert steps.install(rt, [downloading.id]) == 0
        assert steps.republish(rt, [downloading.id]) == 1
        assert retained.wait(lambda r: r.docs[downloading.device_id]["stage"] == "cancel")
        # and the device's CANCELED ends it, freeing its slot
        report(rt, [downloading], ReportState.CANCELED, error=ErrorCode.CANCELED)
        steps.finalize(rt, [downloading.id])
        assert _row(rt, downloading.id).state == UpdateState.CANCELED
        assert downloading.device_id not in retained.docs  # cleared by finalize
        # Installing devices are never stopped; failures at the install step are not retried
        installing = updates(rt, rollout_id, UpdateState.OFFERED)[0]
        report(rt, [installing], ReportState.VERIFIED, ReportState.INSTALLING)
        with rt.sessions() as session, pytest.raises(Conflict, match="never interrupted"):
            device_actions.request_stop(session, rollout_id, installing.device_id)
        report(rt, [installing], ReportState.FAILED, error=ErrorCode.INSTALL_ERROR)
        with rt.sessions() as session, pytest.raises(Conflict, match="never installs an update twice"):
            device_actions.retry_update(session, rollout_id, installing.device_id)
    finally:
        retained.close()


def test_a_device_asked_to_stop_that_never_answers_times_out_without_a_new_attempt(rt: Runtime) -> None:
    rollout_id, _ = plan_rollout(rt, 1, RolloutPolicy(waves=["100%"], max_attempts=3))
    waves.kick(rt, rollout_id)
    (offered,) = updates(rt, rollout_id, UpdateState.OFFERED)
    with rt.sessions() as session:
        device_actions.request_stop(session, rollout_id, offered.device_id)
        session.execute(
            update(DeviceUpdate)
            .where(DeviceUpdate.id == offered.id)
            .values(deadline_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    stats = reconciler.reconcile_once(rt)
    assert stats.get("timed_out") == 1 and counts(rt, rollout_id) == {"TIMED_OUT": 1}
    assert not [name for name, _ in queued_messages(rt) if name == "fleet.offer"]


@pytest.fixture
def stack(tmp_path: Path, database_url: str, redis_url: str, mqtt_broker: Any) -> Iterator[Harness]:
    if not database_url.startswith("sqlite") or mqtt_broker.kind == "external":
        pytest.skip("runs on [sqlite-embedded]; the steps above run on PostgreSQL as well")
    with running_harness(tmp_path / "stack", database_url, redis_url, mqtt_broker) as h:
        yield h


@pytest.mark.slow
def test_a_device_stops_a_slow_download_when_asked_and_the_others_update(stack: Harness) -> None:
    h = stack
    # Given four devices, one of them on a slow link
    h.start_fleet(3, prefix="quick-", profile="instant", params=QUICK_REAL)
    h.start_fleet(
        1, prefix="slow-", profile="instant", params={**QUICK_REAL, "bandwidth": "20000:20000"}, seed=3
    )
    rollout_id = h.start_rollout("", RolloutPolicy(waves=["100%"]))
    slow = "slow-00000"
    assert h.wait(
        lambda: any(u.device_id == slow and u.state == "DOWNLOADING" for u in h.updates(rollout_id)), 30
    )
    # When the operator asks the slow one to stop
    with session_scope(h.database_url) as session:
        row = device_actions.request_stop(session, rollout_id, slow, actor="api:ops")
    send_stage([row.id])
    # Then it ends CANCELED, never installed, still on its old version; the rest updated
    h.wait_status(rollout_id, "COMPLETED", timeout=60)
    assert h.counts(rollout_id) == {"SUCCEEDED": 3, "CANCELED": 1}
    assert h.versions("slow-") == {"1.0.0": 1} and h.versions("quick-") == {"1.1.0": 3}
    events = [e for e in h.events(rollout_id) if e.device_id == slow and e.kind == "report" and e.accepted]
    assert "INSTALLING" not in [e.name for e in events] and events[-1].name == "CANCELED"


def test_a_stopped_update_that_was_already_installing_is_told_everything_else_as_usual(
    rt: Runtime, mqtt_broker: Any
) -> None:
    # Given a device asked to stop after it had the install document and began installing
    policy = RolloutPolicy(waves=["100%"], soak={"duration_s": 60, "heartbeat_s": 1})
    rollout_id, prefix = plan_rollout(rt, 1, policy)
    retained = Retained(mqtt_broker, prefix)
    try:
        waves.kick(rt, rollout_id)
        (row,) = updates(rt, rollout_id, UpdateState.OFFERED)
        report(rt, [row], ReportState.VERIFIED)
        with rt.sessions() as session:
            device_actions.request_stop(session, rollout_id, row.device_id)
        report(rt, [row], ReportState.INSTALLING, ReportState.REBOOTING)
        # Then the installing row still gets its own documents, not cancel
        assert steps.republish(rt, [row.id]) == 1
        assert retained.wait(lambda r: r.docs[row.device_id]["stage"] == "install")
        # and once it soaks, the soak document
        report(rt, [row], ReportState.SUCCEEDED, version=target_version(rt, rollout_id))
        assert steps.republish(rt, [row.id]) == 1
        assert retained.wait(lambda r: r.docs[row.device_id]["stage"] == "soak")
    finally:
        retained.close()


def test_a_retry_joins_the_running_wave_and_no_timeout_after_installing_is_retried(rt: Runtime) -> None:
    policy = RolloutPolicy(waves=[1, "100%"], max_attempts=1, success_threshold=0)
    rollout_id, _ = plan_rollout(rt, 3, policy)
    waves.kick(rt, rollout_id)
    (first,) = updates(rt, rollout_id, UpdateState.OFFERED)
    report(rt, [first], ReportState.FAILED, error=ErrorCode.DOWNLOAD_ERROR)
    steps.finalize(rt, [first.id])  # wave 0 closes (threshold 0), wave 1 starts
    with rt.sessions() as session:
        again = device_actions.retry_update(session, rollout_id, first.device_id)
        from orchestrator.models import Wave

        wave = session.get_one(Wave, again.wave_id)
    assert (again.state, wave.index) == (UpdateState.QUEUED, 1)
    # An update that timed out while installing is never retried: the device may have installed it
    second = next(u for u in updates(rt, rollout_id, UpdateState.OFFERED) if u.id != first.id)
    report(rt, [second], ReportState.VERIFIED, ReportState.INSTALLING)
    with rt.sessions() as session:
        session.execute(
            update(DeviceUpdate)
            .where(DeviceUpdate.id == second.id)
            .values(deadline_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    reconciler.reconcile_once(rt)
    assert _row(rt, second.id).state == UpdateState.TIMED_OUT
    with rt.sessions() as session, pytest.raises(Conflict, match="never installs an update twice"):
        device_actions.retry_update(session, rollout_id, second.device_id)
