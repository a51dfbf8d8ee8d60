"""Engine steps and the reconciler, run in this process against a real database, Redis and broker.

No worker runs here: step messages the code sends stay in the Redis queue, where the tests read them,
and the tests call the steps themselves, as often and as concurrently as they like, to show that
every step is idempotent, that admission is a hard cap, and that the reconciler resumes what a
crash left half done.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from orchestrator import policy as policy_module
from orchestrator.db import session_scope
from orchestrator.engine import reconciler, steps, waves
from orchestrator.engine.admission import admit
from orchestrator.engine.runtime import Runtime
from orchestrator.models import DeviceUpdate, Event, Rollout, Wave, utcnow
from orchestrator.policy import RolloutPolicy
from orchestrator.protocol import ReportState
from orchestrator.state_machines import UpdateState, WaveState
from tests.integration.engine_kit import (
    Retained,
    counts,
    in_flight,
    plan_rollout,
    queued_messages,
    report,
    target_version,
    updates,
)

pytestmark = [pytest.mark.integration]


# ====================================================================== admission
def test_admission_is_a_hard_cap_even_when_admissions_race(rt: Runtime, mqtt_broker: Any) -> None:
    # Given a running wave of 120 devices and max_in_flight 25
    rollout_id, _ = plan_rollout(rt, 120, RolloutPolicy(waves=["100%"], max_in_flight=25))
    with rt.sessions() as session:
        wave = session.scalars(select(Wave).where(Wave.rollout_id == rollout_id)).one()
        waves.start_wave(session, session.get_one(Rollout, rollout_id), wave)
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, in_flight(rt, rollout_id))
            time.sleep(0.01)

    def admit_many() -> None:
        for _ in range(5):
            admit(rt, rollout_id)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # When six admissions run at once, again after devices finish
    for _round in range(3):
        threads = [threading.Thread(target=admit_many) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert in_flight(rt, rollout_id) == 25
        # ten devices end: ten slots free up
        finishing = updates(rt, rollout_id, UpdateState.OFFERED)[:10]
        report(rt, finishing, ReportState.VERIFIED, ReportState.INSTALLING)
        done = report(rt, finishing, ReportState.SUCCEEDED, version=target_version(rt, rollout_id))
        assert len(done.finalize_ids) == 10, done.counters
        assert in_flight(rt, rollout_id) == 15
    stop.set()
    watcher.join()
    # Then devices in flight never exceeded the cap
    assert peak == 25
    offers = Counter(
        e.device_update_id for e in _events(rt, rollout_id) if e.name == "offer" and e.kind == "transition"
    )
    assert offers and max(offers.values()) == 1  # and no device was offered twice


def _events(rt: Runtime, rollout_id: int) -> list[Event]:
    with session_scope(rt.settings.database_url) as session:
        return list(session.scalars(select(Event).where(Event.rollout_id == rollout_id).order_by(Event.id)))


# ====================================================================== idempotency
def test_every_step_run_twice_changes_nothing_twice(rt: Runtime, mqtt_broker: Any) -> None:
    rollout_id, prefix = plan_rollout(rt, 6, RolloutPolicy(waves=["100%"], max_in_flight=4))
    retained = Retained(mqtt_broker, prefix)
    try:
        # kick twice: one wave start, four devices offered (the cap), the second kick changes nothing
        waves.kick(rt, rollout_id)
        waves.kick(rt, rollout_id)
        assert counts(rt, rollout_id) == {"OFFERED": 4, "QUEUED": 2}
        assert admit(rt, rollout_id) == 0
        assert retained.wait(lambda r: len(r.docs) == 4)
        # install twice for the same VERIFIED updates: the same install document, retained once
        offered = updates(rt, rollout_id, UpdateState.OFFERED)
        out = report(rt, offered[:2], ReportState.DOWNLOADING, ReportState.DOWNLOADED, ReportState.VERIFIED)
        assert sorted(out.install_ids) == [du.id for du in offered[:2]]
        assert steps.install(rt, out.install_ids) == 2
        assert steps.install(rt, out.install_ids) == 2
        assert retained.wait(lambda r: all(r.docs[du.device_id]["stage"] == "install" for du in offered[:2]))
        assert steps.install(rt, [du.id for du in offered[2:]]) == 0  # not VERIFIED: left alone
        # finalize twice: counted once, desired cleared once and for all
        out = report(rt, offered[:2], ReportState.INSTALLING, ReportState.REBOOTING)
        out = report(rt, offered[:2], ReportState.SUCCEEDED, version=target_version(rt, rollout_id))
        assert steps.finalize(rt, out.finalize_ids) == 2
        assert steps.finalize(rt, out.finalize_ids) == 0
        assert retained.wait(lambda r: not any(du.device_id in r.docs for du in offered[:2]))
        # finalize freed two slots: the two queued devices were offered
        assert counts(rt, rollout_id) == {"SUCCEEDED": 2, "OFFERED": 4}
        # close_wave on a wave with open updates does nothing, however often
        with rt.sessions() as session:
            wave_id = session.scalars(select(Wave.id).where(Wave.rollout_id == rollout_id)).one()
        assert waves.close_wave(rt, wave_id) is None
        assert waves.close_wave(rt, wave_id) is None
        events = _events(rt, rollout_id)
        ends = Counter(e.device_update_id for e in events if e.to_state == "SUCCEEDED" and e.accepted)
        assert set(ends.values()) == {1}
        assert Counter(e.name for e in events if e.kind == "transition")["offer"] == 6
    finally:
        retained.close()


# ====================================================================== reconciler
def test_reconciler_resumes_a_wave_launch_cut_short(rt: Runtime, mqtt_broker: Any) -> None:
    # Given a worker that died right after committing the wave start (nothing admitted, nothing sent)
    rollout_id, prefix = plan_rollout(rt, 30, RolloutPolicy(waves=["100%"], max_in_flight=20))
    with rt.sessions() as session:
        wave = session.scalars(select(Wave).where(Wave.rollout_id == rollout_id)).one()
        waves.start_wave(session, session.get_one(Rollout, rollout_id), wave)
    assert counts(rt, rollout_id) == {"QUEUED": 30}
    retained = Retained(mqtt_broker, prefix)
    try:
        # When the reconciler runs
        stats = reconciler.reconcile_once(rt)
        # Then it admitted up to the cap and the devices were told
        assert stats.get("admitted") == 20
        assert counts(rt, rollout_id) == {"OFFERED": 20, "QUEUED": 10}
        assert retained.wait(lambda r: len(r.docs) == 20)
        # Given offers whose desired documents were lost (worker killed after the commit)
        offered = updates(rt, rollout_id, UpdateState.OFFERED)[:5]
        for du in offered:
            retained.client.publish(f"fleet/v1/devices/{du.device_id}/desired", b"", qos=1, retain=True)
        assert retained.wait(lambda r: len(r.docs) == 15)
        with rt.sessions() as session:
            session.execute(
                update(DeviceUpdate)
                .where(DeviceUpdate.id.in_([du.id for du in offered]))
                .values(updated_at=utcnow() - timedelta(seconds=30))
            )
            session.commit()
        # When the reconciler runs: the offer is sent again, once, and repeated later only with backoff
        reconciler.reconcile_once(rt)
        reconciler.reconcile_once(rt)
        republish = [args[0] for name, args in queued_messages(rt) if name == "fleet.republish"]
        assert republish == [[du.id for du in offered]]
        assert steps.republish(rt, republish[0]) == 5
        assert retained.wait(lambda r: len(r.docs) == 20)
    finally:
        retained.close()


def test_reconciler_keeps_per_stage_deadlines(rt: Runtime) -> None:
    rollout_id, _ = plan_rollout(rt, 3, RolloutPolicy(waves=["100%"], max_attempts=2, retry_backoff_s=60))
    waves.kick(rt, rollout_id)
    slow, verified, _idle = updates(rt, rollout_id, UpdateState.OFFERED)
    report(rt, [verified], ReportState.VERIFIED)
    past = utcnow() - timedelta(seconds=1)
    with rt.sessions() as session:
        # the download deadline of both has passed; `verified` since got its install deadline
        session.execute(update(DeviceUpdate).where(DeviceUpdate.id == slow.id).values(deadline_at=past))
        session.execute(
            update(DeviceUpdate)
            .where(DeviceUpdate.id == verified.id)
            .values(offered_at=utcnow() - timedelta(hours=1))
        )
        session.commit()
    stats = reconciler.reconcile_once(rt)
    assert stats.get("timed_out_retry") == 1
    rows = {du.id: du for du in updates(rt, rollout_id)}
    assert rows[verified.id].state == UpdateState.VERIFIED  # not timed out against the download deadline
    retrying = rows[slow.id]
    assert retrying.state == UpdateState.RETRYING and retrying.error_code == "timeout"
    assert retrying.deadline_at is not None and retrying.deadline_at > utcnow() + timedelta(seconds=50)
    # once the backoff has passed, the retry is queued and offered as attempt 2
    with rt.sessions() as session:
        session.execute(update(DeviceUpdate).where(DeviceUpdate.id == slow.id).values(deadline_at=past))
        session.commit()
    stats = reconciler.reconcile_once(rt)
    assert stats.get("requeued") == 1
    again = next(du for du in updates(rt, rollout_id) if du.id == slow.id)
    assert again.state == UpdateState.OFFERED and again.attempt == 2
    # the install deadline passing with no attempt left: TIMED_OUT, finalized
    with rt.sessions() as session:
        session.execute(
            update(DeviceUpdate)
            .where(DeviceUpdate.id.in_([slow.id, verified.id]))
            .values(deadline_at=past, attempt=2)
        )
        session.commit()
    reconciler.reconcile_once(rt)
    rows = {du.id: du for du in updates(rt, rollout_id)}
    for du_id in (slow.id, verified.id):
        assert rows[du_id].state == UpdateState.TIMED_OUT and rows[du_id].finalized_at is not None


def test_one_broken_rollout_does_not_stop_the_pass(rt: Runtime) -> None:
    # Given two rollouts with an expired offer each, one of them with a policy that no longer parses
    broken, _ = plan_rollout(rt, 1, RolloutPolicy(waves=["100%"]))
    healthy, _ = plan_rollout(rt, 1, RolloutPolicy(waves=["100%"], max_attempts=1))
    for rollout_id in (broken, healthy):
        waves.kick(rt, rollout_id)
    with rt.sessions() as session:
        session.execute(update(DeviceUpdate).values(deadline_at=utcnow() - timedelta(seconds=1)))
        session.execute(update(Rollout).where(Rollout.id == broken).values(policy={"waves": "not a list"}))
        session.commit()
    policy_module._policies.clear()  # policies are parsed once per process; this one changed under it
    # When the reconciler runs
    stats = reconciler.reconcile_once(rt)
    # Then the healthy rollout's update timed out and its wave closed; the broken one is reported
    assert stats.get("timeout_errors") == 1
    assert counts(rt, healthy) == {"TIMED_OUT": 1}
    with rt.sessions() as session:
        assert session.scalar(select(Wave.status).where(Wave.rollout_id == healthy)) == WaveState.FAILED
    assert counts(rt, broken) == {"OFFERED": 1}
