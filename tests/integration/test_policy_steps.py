"""Rollout policy in the engine's steps, on real SQL, Redis and broker, with a controllable clock.

Maintenance windows, the rate ramp, offline devices, the end time and continuous rollouts, each
driven step by step (no worker) so the clock can jump to a window or past an end time.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import time_machine
from sqlalchemy import select, update

from orchestrator.db import session_scope
from orchestrator.engine import lifetime, reconciler, steps, waves
from orchestrator.engine.admission import admit
from orchestrator.engine.runtime import Runtime
from orchestrator.ingest.inventory import apply_inventory
from orchestrator.models import Device, DeviceUpdate, Rollout, Wave, utcnow
from orchestrator.policy import RolloutPolicy, Target
from orchestrator.portal import rollout_summary
from orchestrator.protocol import ErrorCode, Health, ReportState
from orchestrator.services.device_service import set_tags
from orchestrator.services.rollout_planner import create_rollout
from orchestrator.services.rollout_service import start_rollout
from orchestrator.state_machines import UpdateState, WaveState
from tests.factories import add_devices, add_firmware_row
from tests.integration.engine_kit import (
    Retained,
    counts,
    plan_rollout,
    queued_messages,
    report,
    target_version,
    updates,
)

pytestmark = [pytest.mark.integration]


def _set_online(rt: Runtime, device_ids: list[str], online: bool) -> None:
    with rt.sessions() as session:
        session.execute(
            update(Device).where(Device.id.in_(device_ids)).values(online=online, last_seen=utcnow())
        )
        session.commit()


def _row(rt: Runtime, update_id: int) -> DeviceUpdate:
    with rt.sessions() as session:
        return session.get_one(DeviceUpdate, update_id)


# ====================================================================== maintenance windows
def test_install_is_sent_only_inside_a_window_with_room(rt: Runtime, mqtt_broker: Any) -> None:
    # Given a rollout whose only window opens in an hour, for an hour, and installs that take 10 min
    now = utcnow()
    opens, closes = now + timedelta(hours=1), now + timedelta(hours=2)
    policy = RolloutPolicy(waves=["100%"], install_timeout_s=600, windows=[{"start": opens, "end": closes}])
    rollout_id, prefix = plan_rollout(rt, 2, policy)
    retained = Retained(mqtt_broker, prefix)
    try:
        waves.kick(rt, rollout_id)
        first, second = updates(rt, rollout_id, UpdateState.OFFERED)
        assert retained.wait(lambda r: len(r.docs) == 2)  # devices download any time
        # When a device has verified its download outside the window
        report(rt, [first], ReportState.VERIFIED)
        # Then the install stage is not sent; the update waits for the window, its deadline from there
        assert steps.install(rt, [first.id]) == 0
        waiting = _row(rt, first.id)
        assert waiting.state == UpdateState.VERIFIED
        assert waiting.redrive_at == opens
        assert waiting.deadline_at == opens + timedelta(seconds=600)
        assert retained.docs[first.device_id]["stage"] == "download"
        # and the reconciler does not time it out meanwhile, nor re-send the install early
        assert reconciler.reconcile_once(rt).get("timed_out_retry") is None
        with rt.sessions() as session:
            summary = rollout_summary(session, rollout_id)
        assert summary is not None and summary.pacing is not None
        assert summary.pacing["window_open"] is False and summary.pacing["waiting_for_window"] == 1
        # When the window has opened
        with time_machine.travel(opens + timedelta(seconds=1), tick=True):
            assert steps.install(rt, [first.id]) == 1
        assert retained.wait(lambda r: r.docs[first.device_id]["stage"] == "install")
        # And the second verifies so late in the window that its install would not fit
        report(rt, [second], ReportState.VERIFIED)
        with time_machine.travel(closes - timedelta(seconds=300), tick=True):
            assert steps.install(rt, [second.id]) == 0
            assert steps.republish(rt, [second.id]) == 0  # a re-send never installs outside a window
        assert retained.docs[second.device_id]["stage"] == "download"
    finally:
        retained.close()


# ====================================================================== rate ramp
def test_offers_follow_the_rate_ramp(rt: Runtime) -> None:
    # Given 20 devices, 3 offers a minute doubling per 3 successes up to 12, and room in flight
    rate = {"initial_per_minute": 3, "factor": 2, "every_succeeded": 3, "max_per_minute": 12}
    policy = RolloutPolicy(waves=["100%"], max_in_flight=100, rate=rate)
    rollout_id, _ = plan_rollout(rt, 20, policy)
    # When the rollout starts, only the first minute's rate goes out, however often admission runs
    waves.kick(rt, rollout_id)
    assert admit(rt, rollout_id) == 0
    offered = updates(rt, rollout_id, UpdateState.OFFERED)
    assert len(offered) == 3
    # When those three succeed, the rate doubles to 6: three more fit in this minute
    report(rt, offered, ReportState.SUCCEEDED, version=target_version(rt, rollout_id))
    steps.finalize(rt, [u.id for u in offered])
    assert counts(rt, rollout_id) == {"SUCCEEDED": 3, "OFFERED": 3, "QUEUED": 14}
    with rt.sessions() as session:
        summary = rollout_summary(session, rollout_id)
    assert summary is not None and summary.pacing is not None
    assert summary.pacing["rate_per_minute"] == 6 and summary.pacing["offered_last_minute"] == 6
    # Then a minute later the window has slid and six more go out
    with time_machine.travel(utcnow() + timedelta(seconds=61), tick=True):
        assert admit(rt, rollout_id) == 6
    # and the ramp stops at its maximum
    later = updates(rt, rollout_id, UpdateState.OFFERED)
    report(rt, later, ReportState.SUCCEEDED, version=target_version(rt, rollout_id))
    steps.finalize(rt, [u.id for u in later])
    with time_machine.travel(utcnow() + timedelta(seconds=122), tick=True):
        assert admit(rt, rollout_id) == 8  # the 8 left; 12 would have fitted
    assert counts(rt, rollout_id) == {"SUCCEEDED": 12, "OFFERED": 8}


# ====================================================================== offline devices
def test_an_offline_device_holds_no_slot_and_its_clock_stands_still(rt: Runtime) -> None:
    # Given three devices, one slot in flight, and the first device offline
    policy = RolloutPolicy(waves=["100%"], max_in_flight=1, download_timeout_s=60, max_attempts=1)
    rollout_id, prefix = plan_rollout(rt, 3, policy)
    away = f"{prefix}00000"
    _set_online(rt, [away], False)
    # When the rollout starts, the slot goes to an online device
    waves.kick(rt, rollout_id)
    (offered,) = updates(rt, rollout_id, UpdateState.OFFERED)
    assert offered.device_id != away
    with rt.sessions() as session:
        summary = rollout_summary(session, rollout_id)
    assert summary is not None and summary.pacing is not None and summary.pacing["waiting_offline"] == 1
    # When the offered device goes offline and its deadline passes while it is away
    _set_online(rt, [offered.device_id], False)
    with rt.sessions() as session:
        session.execute(
            update(DeviceUpdate)
            .where(DeviceUpdate.id == offered.id)
            .values(deadline_at=utcnow() - timedelta(seconds=1))
        )
        session.execute(
            update(Device)
            .where(Device.id == offered.device_id)
            .values(last_seen=utcnow() - timedelta(seconds=100))
        )
        session.commit()
    # Then the reconciler does not time it out: it could not act
    reconciler.reconcile_once(rt)
    assert _row(rt, offered.id).state == UpdateState.OFFERED
    # When it comes back, its deadline moves out by as long as it was away
    with session_scope(rt.settings.database_url) as session:
        apply_inventory(session, {}, {offered.device_id: True})
    assert _row(rt, offered.id).deadline_at > utcnow() + timedelta(seconds=90)  # type: ignore[operator]
    # When it succeeds and the offline device comes online, that one is offered next
    report(rt, [offered], ReportState.SUCCEEDED, version=target_version(rt, rollout_id))
    steps.finalize(rt, [offered.id])
    (second,) = updates(rt, rollout_id, UpdateState.OFFERED)
    assert second.device_id != away
    report(rt, [second], ReportState.SUCCEEDED, version=target_version(rt, rollout_id))
    steps.finalize(rt, [second.id])
    assert counts(rt, rollout_id) == {"SUCCEEDED": 2, "QUEUED": 1}
    with session_scope(rt.settings.database_url) as session:
        apply_inventory(session, {}, {away: True})
    reconciler.reconcile_once(rt)
    (last,) = updates(rt, rollout_id, UpdateState.OFFERED)
    assert last.device_id == away


# ====================================================================== end time
def test_at_the_end_time_what_was_not_offered_is_skipped_and_the_rollout_completes(rt: Runtime) -> None:
    # Given four devices, one slot, an end time in an hour, and the last device offline
    end = utcnow() + timedelta(hours=1)
    policy = RolloutPolicy(
        waves=["100%"], max_in_flight=1, end_at=end, failure_threshold_count=1, download_timeout_s=7200
    )
    rollout_id, prefix = plan_rollout(rt, 4, policy)
    _set_online(rt, [f"{prefix}00003"], False)
    waves.kick(rt, rollout_id)
    (started,) = updates(rt, rollout_id, UpdateState.OFFERED)
    # When the end time passes with one device started and the rest never offered
    with time_machine.travel(end + timedelta(seconds=1), tick=True):
        stats = reconciler.reconcile_once(rt)
        assert stats.get("skipped_at_end") == 3
        # Then no offer goes out any more, the started device goes on, and the skips name their reason
        assert admit(rt, rollout_id) == 0
        rows = {u.device_id: u for u in updates(rt, rollout_id)}
        assert rows[f"{prefix}00003"].error_code == "offline"
        skipped = [u for u in rows.values() if u.state == UpdateState.SKIPPED]
        assert sorted(u.error_code or "" for u in skipped) == ["offline", "window_closed", "window_closed"]
        assert rows[started.device_id].state == UpdateState.OFFERED
        # When the started device finishes, the rollout completes: skips count against nothing
        report(rt, [started], ReportState.SUCCEEDED, version=target_version(rt, rollout_id))
        steps.finalize(rt, [started.id])
    with rt.sessions() as session:
        rollout = session.get_one(Rollout, rollout_id)
        assert str(rollout.status) == "COMPLETED"
        summary = rollout_summary(session, rollout_id)
    assert summary is not None and summary.skipped == {"offline": 1, "window_closed": 2}


# ====================================================================== continuous
def test_a_continuous_rollout_takes_in_matching_devices_until_its_end(rt: Runtime) -> None:
    # Given two tagged devices and a continuous rollout for the tag, ending in an hour
    end = utcnow() + timedelta(hours=1)
    with session_scope(rt.settings.database_url) as session:
        ids = add_devices(session, 2, prefix="cont-a-")
        set_tags(session, ids, add=["pilot"])
        firmware = add_firmware_row(session, version="7.0.0")
        rollout = create_rollout(
            session,
            name="continuous",
            firmware_id=firmware.id,
            target=Target(model="sensor-v2", tags=["pilot"]),
            policy=RolloutPolicy(waves=["100%"], continuous=True, end_at=end),
        )
        session.commit()
        start_rollout(session, rollout.id, actor="test", send=False)
        rollout_id = rollout.id
    waves.kick(rt, rollout_id)
    first = updates(rt, rollout_id, UpdateState.OFFERED)
    report(rt, first, ReportState.SUCCEEDED, version="7.0.0")
    steps.finalize(rt, [u.id for u in first])
    # Then with every device done the last wave stays open and the rollout keeps running
    with rt.sessions() as session:
        (wave,) = session.scalars(select(Wave).where(Wave.rollout_id == rollout_id))
        assert wave.status == WaveState.RUNNING
        assert str(session.get_one(Rollout, rollout_id).status) == "RUNNING"
    # When new devices register: one tagged, one not, one tagged but already on the version
    with session_scope(rt.settings.database_url) as session:
        (fresh,) = add_devices(session, 1, prefix="cont-b-")
        add_devices(session, 1, prefix="cont-c-")
        (current,) = add_devices(session, 1, prefix="cont-d-", version="7.0.0")
        set_tags(session, [fresh, current], add=["pilot"])
    # Then only the one that can update joins the last wave and is offered
    assert lifetime.join_new_devices(rt, rollout_id) == 1
    assert lifetime.join_new_devices(rt, rollout_id) == 0
    (joined,) = updates(rt, rollout_id, UpdateState.OFFERED)
    assert joined.device_id == fresh
    report(rt, [joined], ReportState.SUCCEEDED, version="7.0.0")
    steps.finalize(rt, [joined.id])
    # When the end time passes, nothing joins any more and the rollout completes
    with time_machine.travel(end + timedelta(seconds=1), tick=True):
        with session_scope(rt.settings.database_url) as session:
            (late,) = add_devices(session, 1, prefix="cont-e-")
            set_tags(session, [late], add=["pilot"])
        assert lifetime.join_new_devices(rt, rollout_id) == 0
        reconciler.reconcile_once(rt)
    with rt.sessions() as session:
        assert str(session.get_one(Rollout, rollout_id).status) == "COMPLETED"
        assert session.get_one(Rollout, rollout_id).total == 3
    assert counts(rt, rollout_id) == {"SUCCEEDED": 3}


# ====================================================================== health-gated soak
def test_a_soak_passes_the_healthy_and_rolls_back_the_unhealthy_and_the_silent(
    rt: Runtime, mqtt_broker: Any
) -> None:
    # Given three devices under a one-minute soak with heartbeats every second
    soak = {"duration_s": 60, "heartbeat_s": 1, "missed_heartbeats": 3}
    policy = RolloutPolicy(waves=["100%"], soak=soak, success_threshold=0.3)
    rollout_id, prefix = plan_rollout(rt, 3, policy)
    version = target_version(rt, rollout_id)
    retained = Retained(mqtt_broker, prefix)
    try:
        waves.kick(rt, rollout_id)
        healthy, sick, silent = updates(rt, rollout_id, UpdateState.OFFERED)
        # When all three report success, they soak instead of ending, and are told to report health
        outcome = report(rt, [healthy, sick, silent], ReportState.SUCCEEDED, version=version)
        assert sorted(outcome.stage_ids) == sorted(u.id for u in (healthy, sick, silent))
        assert counts(rt, rollout_id) == {"SOAKING": 3}
        steps.republish(rt, outcome.stage_ids)
        assert retained.wait(
            lambda r: all(d.get("stage") == "soak" for d in r.docs.values()) and len(r.docs) == 3
        )
        assert retained.docs[healthy.device_id]["heartbeat_s"] == 1
        # When one heartbeat says the application is unhealthy, that device is told to roll back
        ok = Health(boot_count=2, uptime_s=5, app_healthy=True)
        report(rt, [healthy], ReportState.SUCCEEDED, version=version, health=ok)
        bad = report(
            rt,
            [sick],
            ReportState.SUCCEEDED,
            version=version,
            health=Health(boot_count=2, uptime_s=5, app_healthy=False),
        )
        assert bad.stage_ids == [sick.id] and _row(rt, sick.id).state == UpdateState.ROLLING_BACK
        steps.republish(rt, bad.stage_ids)
        assert retained.wait(lambda r: r.docs[sick.device_id]["stage"] == "rollback")
        report(rt, [sick], ReportState.ROLLED_BACK, version="1.0.0", error=ErrorCode.HEALTH)
        steps.finalize(rt, [sick.id])
        assert _row(rt, sick.id).error_code == "health"
        # and the soak's progress shows on the healthy one
        assert 0 <= _row(rt, healthy.id).progress < 100
        # When the soak ends with the healthy one still beating and the silent one quiet
        ends = _row(rt, healthy.id).deadline_at
        assert ends is not None
        with time_machine.travel(ends - timedelta(seconds=1), tick=True):
            report(rt, [healthy], ReportState.SUCCEEDED, version=version, health=ok)
        with time_machine.travel(ends + timedelta(seconds=2), tick=True):
            stats = reconciler.reconcile_once(rt)
        # Then the healthy one succeeded, and the silent one is told to roll back too
        assert stats.get("soak_passed") == 1 and stats.get("soak_silent") == 1
        assert _row(rt, healthy.id).state == UpdateState.SUCCEEDED
        assert _row(rt, silent.id).state == UpdateState.ROLLING_BACK
        sent = [args[0] for name, args in queued_messages(rt) if name == "fleet.republish"]
        assert sent == [[silent.id]]  # a worker publishes the rollback document
        steps.republish(rt, sent[0])
        assert retained.wait(lambda r: r.docs.get(silent.device_id, {}).get("stage") == "rollback")
        assert healthy.device_id not in retained.docs  # finalized: the soak document is cleared
        report(rt, [silent], ReportState.ROLLED_BACK, version="1.0.0", error=ErrorCode.HEALTH)
        steps.finalize(rt, [silent.id])
    finally:
        retained.close()
    # The wave passed on its one healthy device (threshold 0.3) and the rollout completed
    assert counts(rt, rollout_id) == {"SUCCEEDED": 1, "ROLLED_BACK": 2}
    with rt.sessions() as session:
        assert str(session.get_one(Rollout, rollout_id).status) == "COMPLETED"


# ====================================================================== retention
def test_retention_deletes_old_trails_in_batches_but_not_of_a_rollout_in_progress(rt: Runtime) -> None:
    from orchestrator.audit import record
    from orchestrator.engine import retention
    from orchestrator.models import AuditEntry, Event

    # Given an ended rollout and a running one, each with events, and audit entries, all 100 days old
    ended, _ = plan_rollout(rt, 3, RolloutPolicy(waves=["100%"]))
    running, _ = plan_rollout(rt, 3, RolloutPolicy(waves=["100%"]))
    old = utcnow() - timedelta(days=100)
    with rt.sessions() as session:
        session.execute(update(Rollout).where(Rollout.id == ended).values(status="COMPLETED"))
        for rollout_id in (ended, running):
            session.add_all(
                Event(kind="operator", name="note", rollout_id=rollout_id, created_at=old) for _ in range(7)
            )
            record(
                session, actor="system", action="rollout.halt", target_kind="rollout", target_id=rollout_id
            )
        record(session, actor="cli:root", action="token.create", target_kind="token", target_id=1)
        record(session, actor="api:ops", action="group.create")
        session.execute(update(AuditEntry).values(created_at=old))
        session.commit()
    # When retention runs with small batches
    retention.BATCH = 4
    try:
        removed = retention.purge_once(rt)
    finally:
        retention.BATCH = 5000
    # Then the ended rollout's trail is gone and the running one's kept, and so is the recent past
    with rt.sessions() as session:
        kept = session.scalars(
            select(Event.rollout_id).where(Event.created_at < utcnow() - timedelta(days=90))
        ).all()
        audit = session.execute(select(AuditEntry.action, AuditEntry.target_id)).all()
    assert set(kept) == {running} and len(kept) == 7
    assert sorted(audit) == [("rollout.halt", str(running)), ("rollout.start", str(running))]
    assert removed["audit_entries"] == 4 and removed["events"] >= 7
    assert retention.purge_once(rt) == {"events": 0, "audit_entries": 0}


def test_install_waits_for_an_offline_device_and_tells_it_when_the_window_has_no_room_left(
    rt: Runtime, mqtt_broker: Any
) -> None:
    # Given a window open now for another hour, and a verified device that has gone offline
    now = utcnow()
    policy = RolloutPolicy(
        waves=["100%"],
        install_timeout_s=600,
        windows=[{"start": now - timedelta(minutes=5), "end": now + timedelta(hours=1)}],
    )
    rollout_id, prefix = plan_rollout(rt, 2, policy)
    retained = Retained(mqtt_broker, prefix)
    try:
        waves.kick(rt, rollout_id)
        away, here = updates(rt, rollout_id, UpdateState.OFFERED)
        report(rt, [away, here], ReportState.VERIFIED)
        _set_online(rt, [away.device_id], False)
        # Then only the online one is told to install, with the last moment it may begin
        assert steps.install(rt, [away.id, here.id]) == 1
        assert retained.wait(lambda r: r.docs[here.device_id]["stage"] == "install")
        before = retained.docs[here.device_id]["install_before"]
        assert abs(before - (now + timedelta(hours=1) - timedelta(seconds=600)).timestamp()) < 2
        assert retained.docs[away.device_id]["stage"] == "download"
    finally:
        retained.close()


def test_past_the_end_time_an_offline_device_in_flight_times_out(rt: Runtime) -> None:
    end = utcnow() + timedelta(hours=1)
    policy = RolloutPolicy(
        waves=["100%"], end_at=end, max_attempts=1, download_timeout_s=60, success_threshold=0
    )
    rollout_id, _ = plan_rollout(rt, 1, policy)
    waves.kick(rt, rollout_id)
    (row,) = updates(rt, rollout_id, UpdateState.OFFERED)
    _set_online(rt, [row.device_id], False)
    with rt.sessions() as session:
        session.execute(
            update(DeviceUpdate)
            .where(DeviceUpdate.id == row.id)
            .values(deadline_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    reconciler.reconcile_once(rt)
    assert _row(rt, row.id).state == UpdateState.OFFERED  # its clock stands still while it is away
    with time_machine.travel(end + timedelta(seconds=1), tick=True):
        reconciler.reconcile_once(rt)
        assert _row(rt, row.id).state == UpdateState.TIMED_OUT  # but not past the rollout's end
        reconciler.reconcile_once(rt)
    with rt.sessions() as session:
        assert str(session.get_one(Rollout, rollout_id).status) == "COMPLETED"
