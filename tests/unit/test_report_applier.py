"""Device reports applied to SQL: only forward transitions for the current attempt count."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.db import session_factory
from orchestrator.ingest.report_applier import ReportApplier
from orchestrator.models import Device, DeviceUpdate, Event, Firmware
from orchestrator.policy import RolloutPolicy, Target
from orchestrator.protocol import ErrorCode, Report, ReportState
from orchestrator.services.rollout_planner import create_rollout
from orchestrator.state_machines import UpdateEvent, UpdateState
from orchestrator.transitions import transition_update
from tests.factories import add_devices, add_firmware_row


@pytest.fixture
def session(database_url: str) -> Session:
    return session_factory(database_url)()


def _offered(
    session: Session, count: int = 1, max_attempts: int = 2, prefix: str = "dev-"
) -> list[DeviceUpdate]:
    ids = add_devices(session, count, prefix=prefix)
    fw = session.scalars(select(Firmware)).first() or add_firmware_row(session)
    policy = RolloutPolicy(waves=["100%"], max_attempts=max_attempts)
    rollout = create_rollout(
        session, name="r", firmware_id=fw.id, target=Target(device_ids=ids), policy=policy
    )
    session.commit()
    updates = list(session.scalars(select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout.id)))
    for du in updates:
        transition_update(session, du, UpdateEvent.ENQUEUE)
        transition_update(session, du, UpdateEvent.OFFER)
    session.commit()
    return updates


def _report(du: DeviceUpdate, state: ReportState, seq: int, **kw: object) -> tuple[str, Report]:
    fields: dict[str, object] = {"running_version": "1.0.0", "attempt": du.attempt, "progress": 0}
    fields.update(kw)
    return du.device_id, Report(update_id=du.id, state=state, seq=seq, **fields)  # type: ignore[arg-type]


def _state(session: Session, du_id: int) -> UpdateState:
    session.expire_all()
    return session.get_one(DeviceUpdate, du_id).state


def test_reports_in_order_reach_success_and_make_the_next_steps_due(session: Session) -> None:
    [du] = _offered(session)
    applier = ReportApplier()
    out = applier.apply(
        session,
        [
            _report(du, ReportState.DOWNLOADING, 1, progress=50),
            _report(du, ReportState.DOWNLOADED, 2),
            _report(du, ReportState.VERIFIED, 3),
        ],
    )
    assert _state(session, du.id) == UpdateState.VERIFIED
    # three reports of one update in a batch: one row change, one portal document, three events
    assert out.install_ids == [du.id] and out.finalize_ids == [] and len(out.portal) == 1
    assert out.counters["applied"] == 3
    out = applier.apply(session, [_report(du, ReportState.SUCCEEDED, 6, running_version="1.1.0")])
    assert _state(session, du.id) == UpdateState.SUCCEEDED
    assert out.finalize_ids == [du.id] and out.install_ids == []
    assert session.get_one(Device, du.device_id).firmware_version == "1.1.0"
    assert len(out.portal) == 1
    reports = session.scalars(
        select(Event).where(Event.device_update_id == du.id, Event.kind == "report")
    ).all()
    assert [e.name for e in reports] == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "SUCCEEDED"]
    assert [e.to_state for e in reports] == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "SUCCEEDED"]


def test_duplicates_late_and_out_of_order_reports_are_ignored_and_kept(session: Session) -> None:
    [du] = _offered(session)
    applier = ReportApplier()
    # out of order inside one batch: sorted by seq, so VERIFIED (seq 3) applies last
    applier.apply(session, [_report(du, ReportState.VERIFIED, 3), _report(du, ReportState.DOWNLOADING, 1)])
    assert _state(session, du.id) == UpdateState.VERIFIED
    out = applier.apply(
        session,
        [
            _report(du, ReportState.VERIFIED, 3),  # duplicate
            _report(du, ReportState.DOWNLOADED, 2),  # late
        ],
    )
    assert out.counters["ignored_duplicate_or_late"] == 2
    assert _state(session, du.id) == UpdateState.VERIFIED
    ignored = session.scalars(
        select(Event).where(Event.device_update_id == du.id, Event.accepted.is_(False))
    ).all()
    assert len(ignored) == 2


def test_a_report_after_the_end_changes_inventory_not_the_end_state(session: Session) -> None:
    [du] = _offered(session)
    applier = ReportApplier()
    applier.apply(session, [_report(du, ReportState.FAILED, 1, error=ErrorCode.CHECKSUM, attempt=1)])
    # attempts remain (2): FAILED becomes RETRYING, not an end state
    assert _state(session, du.id) == UpdateState.RETRYING
    transition_update(session, session.get_one(DeviceUpdate, du.id), UpdateEvent.REQUEUE)
    session.commit()
    du = session.get_one(DeviceUpdate, du.id)
    transition_update(session, du, UpdateEvent.OFFER)
    session.commit()
    applier.apply(session, [_report(du, ReportState.FAILED, 2, error=ErrorCode.CHECKSUM)])
    assert _state(session, du.id) == UpdateState.FAILED
    out = applier.apply(session, [_report(du, ReportState.SUCCEEDED, 3, running_version="1.1.0")])
    assert out.counters["ignored_after_end"] == 1
    assert _state(session, du.id) == UpdateState.FAILED
    assert session.get_one(Device, du.device_id).firmware_version == "1.1.0"


def test_reports_for_other_attempts_devices_or_unknown_updates_are_dropped(session: Session) -> None:
    first, second = _offered(session, count=2)
    applier = ReportApplier()
    out = applier.apply(
        session,
        [
            _report(first, ReportState.VERIFIED, 1, attempt=2),
            (
                second.device_id,
                Report(
                    update_id=first.id, attempt=1, state=ReportState.SUCCEEDED, seq=1, running_version="x"
                ),
            ),
            (
                first.device_id,
                Report(update_id=999_999, attempt=1, state=ReportState.SUCCEEDED, seq=5, running_version="x"),
            ),
        ],
    )
    assert out.counters["ignored_other_attempt"] == 1
    assert out.counters["ignored_device_mismatch"] == 1
    assert out.counters["unknown_update"] == 1
    assert _state(session, first.id) == UpdateState.OFFERED


def test_success_without_the_target_version_running_fails_the_update(session: Session) -> None:
    # Given an update installing 1.1.0
    [du] = _offered(session)
    applier = ReportApplier()
    applier.apply(session, [_report(du, ReportState.VERIFIED, 1), _report(du, ReportState.INSTALLING, 2)])
    # When the device claims success but still runs 1.0.0
    out = applier.apply(session, [_report(du, ReportState.SUCCEEDED, 3, running_version="1.0.0")])
    # Then the update FAILED with version_mismatch (an install-stage failure: not retried)
    session.expire_all()
    row = session.get_one(DeviceUpdate, du.id)
    assert row.state == UpdateState.FAILED and row.error_code == "version_mismatch"
    assert out.finalize_ids == [du.id] and out.counters["version_mismatch"] == 1
    event = session.scalars(
        select(Event).where(Event.device_update_id == du.id, Event.name == "SUCCEEDED")
    ).one()
    assert event.to_state == "FAILED" and event.detail["error"] == "version_mismatch"


def test_stage_deadlines_follow_the_reports(session: Session) -> None:
    from datetime import timedelta

    from orchestrator.models import utcnow

    [du] = _offered(session, max_attempts=3)
    applier = ReportApplier()
    # VERIFIED starts the install deadline (policy default 900 s), replacing the download deadline
    applier.apply(session, [_report(du, ReportState.VERIFIED, 1)])
    session.expire_all()
    row = session.get_one(DeviceUpdate, du.id)
    assert row.deadline_at is not None
    assert timedelta(seconds=880) < row.deadline_at - utcnow() <= timedelta(seconds=900)
    # a retryable failure makes the row RETRYING, due after the backoff (5 s for attempt 1)
    [other] = _offered(session, count=1, max_attempts=3, prefix="b-")
    out = applier.apply(session, [_report(other, ReportState.FAILED, 1, error=ErrorCode.DOWNLOAD_ERROR)])
    session.expire_all()
    row = session.get_one(DeviceUpdate, other.id)
    assert row.state == UpdateState.RETRYING and out.retry_rollouts == {row.rollout_id}
    assert row.deadline_at is not None and timedelta(0) < row.deadline_at - utcnow() <= timedelta(seconds=5)
