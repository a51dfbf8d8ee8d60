"""Schema, migrations and the SQL side of the state machines, on every configured database."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from orchestrator.db import check_database, session_factory
from orchestrator.errors import IllegalTransition
from orchestrator.models import DeviceUpdate, Event, Firmware, Rollout
from orchestrator.policy import RolloutPolicy, Target
from orchestrator.services.rollout_planner import create_rollout
from orchestrator.state_machines import UpdateEvent, UpdateState
from orchestrator.transitions import bulk_transition_where, transition_update
from tests.factories import add_devices, add_firmware_row


@pytest.fixture
def session(database_url: str) -> Session:
    return session_factory(database_url)()


def test_migrations_match_the_models(database_url: str) -> None:
    check_database(database_url)  # raises on drift


def test_firmware_model_version_is_unique(session: Session) -> None:
    add_firmware_row(session)
    session.add(
        Firmware(model="sensor-v2", version="1.1.0", size=1, sha256="0" * 64, signature="x", storage_path="x")
    )
    with pytest.raises(IntegrityError):
        session.commit()


def test_planner_skips_and_cuts_waves(session: Session) -> None:
    # Given 200 devices on 1.0.0, 5 already on the target, 3 of another model
    add_devices(session, 200)
    add_devices(session, 5, version="1.1.0", prefix="current-")
    add_devices(session, 3, model="gateway-x1", prefix="gw-")
    fw = add_firmware_row(session)
    ids = (
        [f"dev-{i:05d}" for i in range(200)]
        + [f"current-{i:05d}" for i in range(5)]
        + ["gw-00000", "gw-00001"]
    )
    # When a 3-wave rollout is planned for them
    rollout = create_rollout(
        session, name="r", firmware_id=fw.id, target=Target(device_ids=ids), policy=RolloutPolicy()
    )
    session.commit()
    # Then waves are 2/18/180 and the rest is SKIPPED with a reason
    counts = dict(
        session.execute(
            select(DeviceUpdate.state, func.count())
            .where(DeviceUpdate.rollout_id == rollout.id)
            .group_by(DeviceUpdate.state)
        )
        .tuples()
        .all()
    )
    assert counts == {UpdateState.PENDING: 200, UpdateState.SKIPPED: 7}
    reasons = dict(
        session.execute(
            select(DeviceUpdate.error_code, func.count())
            .where(DeviceUpdate.rollout_id == rollout.id, DeviceUpdate.state == UpdateState.SKIPPED)
            .group_by(DeviceUpdate.error_code)
        )
        .tuples()
        .all()
    )
    assert reasons == {"already_on_target": 5, "incompatible": 2}
    wave_sizes = [
        w for w in session.scalars(select(DeviceUpdate.wave_id).where(DeviceUpdate.rollout_id == rollout.id))
    ]
    assert len({w for w in wave_sizes if w is not None}) == 3
    skip_events = session.scalar(select(func.count()).select_from(Event).where(Event.name == "skip"))
    assert skip_events == 7


def test_planner_rejects_unknown_ids_naming_the_field(session: Session) -> None:
    fw = add_firmware_row(session)
    from orchestrator.errors import InvalidInput

    with pytest.raises(InvalidInput) as info:
        create_rollout(
            session, name="r", firmware_id=fw.id, target=Target(device_ids=["nope"]), policy=RolloutPolicy()
        )
    assert info.value.field == "target.device_ids"


def test_planner_writes_10k_rows_in_bulk(session: Session) -> None:
    add_devices(session, 10_000)
    fw = add_firmware_row(session)
    rollout = create_rollout(
        session, name="big", firmware_id=fw.id, target=Target(model="sensor-v2"), policy=RolloutPolicy()
    )
    session.commit()
    assert session.scalar(select(func.count()).where(DeviceUpdate.rollout_id == rollout.id)) == 10_000
    assert rollout.total == 10_000


def _one_update(session: Session) -> DeviceUpdate:
    add_devices(session, 1)
    fw = add_firmware_row(session)
    rollout = create_rollout(
        session, name="r", firmware_id=fw.id, target=Target(model="sensor-v2"), policy=RolloutPolicy()
    )
    session.commit()
    return session.scalars(select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout.id)).one()


def test_transition_writes_an_event_and_rejects_illegal_ones(session: Session) -> None:
    du = _one_update(session)
    transition_update(session, du, UpdateEvent.ENQUEUE)
    session.commit()
    with pytest.raises(IllegalTransition):
        transition_update(session, du, UpdateEvent.REPORT_SUCCEEDED)
    events = session.scalars(select(Event).where(Event.device_update_id == du.id)).all()
    assert [(e.from_state, e.to_state) for e in events] == [("PENDING", "QUEUED")]


def test_concurrent_writers_are_detected(database_url: str) -> None:
    factory = session_factory(database_url)
    first, second = factory(), factory()
    # Separate processes hold short transactions: each reader's transaction has ended before the
    # other writes, and only the version column tells that its copy is stale.
    du_id = _one_update(first).id
    a = first.get_one(DeviceUpdate, du_id)
    first.commit()
    b = second.get_one(DeviceUpdate, du_id)
    second.commit()
    transition_update(first, a, UpdateEvent.ENQUEUE)
    first.commit()
    transition_update(second, b, UpdateEvent.CANCEL)
    with pytest.raises(StaleDataError):
        second.commit()
    second.rollback()
    # a bulk compare-and-set on the state changes nothing once the row moved on
    assert (
        bulk_transition_where(second, UpdateEvent.CANCEL, UpdateState.PENDING, DeviceUpdate.id == du_id) == []
    )
    second.commit()
    assert second.get_one(DeviceUpdate, du_id).state == UpdateState.QUEUED
    first.close()
    second.close()


def test_rollout_version_guards_operator_races(database_url: str) -> None:
    from orchestrator.services.rollout_service import get_rollout
    from orchestrator.state_machines import RolloutEvent
    from orchestrator.transitions import transition_rollout

    factory = session_factory(database_url)
    s1, s2 = factory(), factory()
    rollout_id = _one_update(s1).rollout_id
    r1 = get_rollout(s1, rollout_id)
    s1.commit()
    r2 = get_rollout(s2, rollout_id)
    s2.commit()
    transition_rollout(s1, r1, RolloutEvent.START)
    s1.commit()
    transition_rollout(s2, r2, RolloutEvent.ABORT)
    with pytest.raises(StaleDataError):
        s2.commit()
    s2.rollback()
    assert s2.get_one(Rollout, rollout_id).status == "RUNNING"
    s1.close()
    s2.close()


def test_a_batch_of_row_changes_applies_what_it_can_and_names_the_rest(session: Session) -> None:
    from orchestrator.transitions import RowChange, apply_row_changes

    add_devices(session, 3, prefix="rc-")
    fw = add_firmware_row(session, version="7.7.7")
    rollout = create_rollout(
        session, name="r", firmware_id=fw.id, target=Target(model="sensor-v2"), policy=RolloutPolicy()
    )
    session.commit()
    rows = list(session.scalars(select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout.id)))
    for du in rows:
        transition_update(session, du, UpdateEvent.ENQUEUE)
        transition_update(session, du, UpdateEvent.OFFER)
    session.commit()
    changes = [
        RowChange(
            du.id,
            du.version,
            UpdateState.OFFERED,
            (UpdateEvent.REPORT_DOWNLOADING,),
            UpdateState.DOWNLOADING,
            40,
            1,
        )
        for du in rows
    ]
    # another writer moved the second row on since it was read
    stale = changes[1]
    changes[1] = dataclasses.replace(stale, expected_version=stale.expected_version - 1)
    lost = apply_row_changes(session, changes)
    session.commit()
    assert lost == {rows[1].id}
    session.expire_all()
    states = {du.id: session.get_one(DeviceUpdate, du.id).state for du in rows}
    assert states == {
        rows[0].id: UpdateState.DOWNLOADING,
        rows[1].id: UpdateState.OFFERED,
        rows[2].id: UpdateState.DOWNLOADING,
    }
    # a path the state machine forbids is refused before anything is written
    with pytest.raises(IllegalTransition):
        apply_row_changes(
            session,
            [
                RowChange(
                    rows[0].id, 99, UpdateState.DOWNLOADING, (UpdateEvent.ENQUEUE,), UpdateState.QUEUED, 0, 2
                )
            ],
        )
