"""The AWS IoT Jobs device API answered from SQL, step by step: requests, replies, and the fleet
reports the device's updates turn into, applied by the same report applier as fleet's own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from orchestrator.aws_jobs import RequestTopic, parse_request_topic
from orchestrator.config import Settings
from orchestrator.db import session_scope
from orchestrator.engine.waves import stop_rollout
from orchestrator.errors import Conflict
from orchestrator.ingest.jobs_gateway import JobsGateway
from orchestrator.ingest.report_applier import ReportApplier
from orchestrator.models import Device, DeviceUpdate, Rollout
from orchestrator.policy import RolloutPolicy, Target
from orchestrator.protocol import Report, ReportState
from orchestrator.services import rollout_service
from orchestrator.services.device_actions import request_stop
from orchestrator.services.rollout_planner import create_rollout
from orchestrator.state_machines import RolloutEvent, UpdateEvent
from orchestrator.transitions import transition_update
from tests.factories import add_devices, add_firmware_row

THING = "aws-00000"


@pytest.fixture
def offered(database_url: str) -> Iterator[tuple[Session, int]]:
    """One aws-jobs device with an offered update to 1.1.0, and one fleet device."""
    with session_scope(database_url) as session:
        add_devices(session, 1, prefix="aws-")
        add_devices(session, 1, prefix="fl-")
        session.execute(update(Device).where(Device.id == THING).values(protocol="aws-jobs"))
        firmware = add_firmware_row(session)
        rollout = create_rollout(
            session,
            name="aws",
            firmware_id=firmware.id,
            target=Target(device_ids=[THING]),
            policy=RolloutPolicy(waves=["100%"]),
        )
        session.commit()
        rollout_service.start_rollout(session, rollout.id, actor="test")
        du = session.scalars(select(DeviceUpdate).where(DeviceUpdate.device_id == THING)).one()
        transition_update(session, du, UpdateEvent.ENQUEUE)
        transition_update(session, du, UpdateEvent.OFFER)
        session.commit()
        yield session, du.id


class JobsDevice:
    """Sends requests the way a device would and applies what they stand for."""

    def __init__(self, session: Session, thing: str = THING) -> None:
        self.session = session
        self.thing = thing
        self.gateway = JobsGateway(Settings())
        self.applier = ReportApplier()

    def ask(self, suffix: str, body: dict[str, Any] | bytes) -> tuple[str, dict[str, Any]]:
        topic = parse_request_topic(f"$aws/things/{self.thing}/jobs/{suffix}")
        assert isinstance(topic, RequestTopic)
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        out = self.gateway.handle(self.session, [(topic, payload)], now=1_800_000_000.0)
        self.applier.apply(self.session, out.reports, soak=False)  # commits
        ((reply_topic, reply),) = out.finish(self.session)
        return reply_topic.rsplit("/", 1)[1], json.loads(reply)

    def state(self, update_id: int) -> str:
        self.session.expire_all()
        return str(self.session.get_one(DeviceUpdate, update_id).state)


def test_a_device_takes_its_job_reports_stages_and_succeeds(offered: tuple[Session, int]) -> None:
    session, update_id = offered
    job = f"fleet-{update_id}"
    device = JobsDevice(session)
    # Given the offered update, the device sees one queued execution
    kind, body = device.ask("get", {"clientToken": "t1"})
    assert kind == "accepted" and body["clientToken"] == "t1" and body["timestamp"] == 1_800_000_000
    assert [j["jobId"] for j in body["queuedJobs"]] == [job] and body["inProgressJobs"] == []
    assert body["queuedJobs"][0]["versionNumber"] == 1 and body["queuedJobs"][0]["executionNumber"] == 1
    # When it starts the next job, it gets the document and fleet's update starts downloading
    kind, body = device.ask("start-next", {"clientToken": "t2", "statusDetails": {"stage": "downloading"}})
    execution = body["execution"]
    assert kind == "accepted" and execution["jobId"] == job and execution["status"] == "IN_PROGRESS"
    assert execution["jobDocument"]["firmware"]["version"] == "1.1.0"
    assert execution["jobDocument"]["firmware"]["token"] and execution["versionNumber"] == 2
    assert device.state(update_id) == "DOWNLOADING"
    # Then a stale expectedVersion is refused with the execution's state
    kind, body = device.ask(
        f"{job}/update", {"status": "IN_PROGRESS", "expectedVersion": 1, "clientToken": "t3"}
    )
    assert kind == "rejected" and body["code"] == "VersionMismatch" and body["clientToken"] == "t3"
    assert body["executionState"]["versionNumber"] == 2 and body["executionState"]["status"] == "IN_PROGRESS"
    # And stages move the update on; a status only the service sets is refused
    update = {
        "status": "IN_PROGRESS",
        "expectedVersion": 2,
        "statusDetails": {"stage": "verified", "progress": "100"},
    }
    assert device.ask(f"{job}/update", update)[0] == "accepted"
    assert device.state(update_id) == "VERIFIED"
    kind, body = device.ask(f"{job}/update", {"status": "TIMED_OUT"})
    assert kind == "rejected" and body["code"] == "InvalidRequest"
    kind, body = device.ask(
        f"{job}/update",
        {"status": "SUCCEEDED", "includeJobExecutionState": True, "statusDetails": {"stage": "done"}},
    )
    assert kind == "accepted" and body["executionState"] == {
        "status": "SUCCEEDED",
        "statusDetails": {"stage": "done"},
        "versionNumber": 4,
    }
    assert device.state(update_id) == "SUCCEEDED"
    assert session.get_one(Device, THING).firmware_version == "1.1.0"
    # And after the end, an update is an invalid transition, and nothing is pending any more
    kind, body = device.ask(f"{job}/update", {"status": "IN_PROGRESS"})
    assert kind == "rejected" and body["code"] == "InvalidStateTransition"
    assert body["executionState"]["status"] == "SUCCEEDED"
    assert device.ask("start-next", {"clientToken": "t9"}) == (
        "accepted",
        {"timestamp": 1_800_000_000, "clientToken": "t9"},
    )
    kind, body = device.ask(f"{job}/get", {"includeJobDocument": False})
    assert kind == "accepted" and body["execution"]["status"] == "SUCCEEDED"
    assert "jobDocument" not in body["execution"]


def test_a_failing_device_ends_failed_with_its_reason(offered: tuple[Session, int]) -> None:
    session, update_id = offered
    device = JobsDevice(session)
    device.ask("start-next", {})
    kind, _ = device.ask(
        f"fleet-{update_id}/update",
        {"status": "FAILED", "statusDetails": {"reason": "checksum", "message": "sha256 differs"}},
    )
    assert kind == "accepted"
    session.expire_all()
    row = session.get_one(DeviceUpdate, update_id)
    assert str(row.state) in ("FAILED", "RETRYING") and row.error_code == "checksum"


def test_bad_requests_get_the_right_codes(offered: tuple[Session, int]) -> None:
    session, update_id = offered
    device = JobsDevice(session)
    kind, body = device.ask("get", b"{not json")
    assert kind == "rejected" and body["code"] == "InvalidJson" and "clientToken" not in body
    kind, body = device.ask(f"fleet-{update_id}/update", {"clientToken": "x", "statusDetails": {"a": "b"}})
    assert kind == "rejected" and body["code"] == "InvalidRequest" and body["clientToken"] == "x"
    assert "status" in body["message"]
    for job in ("fleet-999999", "other-job", f"fleet-{update_id + 1}"):
        kind, body = device.ask(f"{job}/get", {})
        assert kind == "rejected" and body["code"] == "ResourceNotFound", job
    kind, body = device.ask(f"fleet-{update_id}/update", {"status": "IN_PROGRESS", "executionNumber": 7})
    assert kind == "rejected" and body["code"] == "ResourceNotFound"
    # a fleet-protocol device is not served on the jobs topics
    kind, body = JobsDevice(session, "fl-00000").ask("get", {})
    assert kind == "rejected" and body["code"] == "ResourceNotFound"
    assert device.state(update_id) == "OFFERED"  # nothing above moved the update


def test_an_abort_cancels_queued_executions_and_started_ones_finish(database_url: str) -> None:
    with session_scope(database_url) as session:
        # Given two AWS devices and a fleet device, all offered; one AWS device started its job
        add_devices(session, 2, prefix="awq-")
        add_devices(session, 1, prefix="flq-")
        session.execute(update(Device).where(Device.id.startswith("awq-")).values(protocol="aws-jobs"))
        firmware = add_firmware_row(session)
        ids = ["awq-00000", "awq-00001", "flq-00000"]
        rollout = create_rollout(
            session, name="q", firmware_id=firmware.id, target=Target(device_ids=ids), policy=RolloutPolicy()
        )
        session.commit()
        rollout_service.start_rollout(session, rollout.id, actor="test")
        rows = {du.device_id: du for du in session.scalars(select(DeviceUpdate))}
        for du in rows.values():
            transition_update(session, du, UpdateEvent.ENQUEUE)
            transition_update(session, du, UpdateEvent.OFFER)
        session.commit()
        started, waiting = JobsDevice(session, "awq-00000"), JobsDevice(session, "awq-00001")
        assert started.ask("start-next", {})[1]["execution"]["status"] == "IN_PROGRESS"
        # When the rollout is aborted
        stop_rollout(session, rollout, RolloutEvent.ABORT, reason="test", actor="test")
        session.commit()
        # Then only the execution nobody started is canceled; fleet's offered device is untouched
        states = {d: started.state(du.id) for d, du in rows.items()}
        assert states == {"awq-00000": "DOWNLOADING", "awq-00001": "CANCELED", "flq-00000": "OFFERED"}
        # and the device whose job was canceled finds nothing to start and cannot take it up
        assert "execution" not in waiting.ask("start-next", {})[1]
        job = f"fleet-{rows['awq-00001'].id}"
        kind, body = waiting.ask(f"{job}/update", {"status": "IN_PROGRESS"})
        assert kind == "rejected" and body["code"] == "InvalidStateTransition"
        assert body["executionState"]["status"] == "CANCELED"
        # while the started one runs to its end
        kind, _ = started.ask(f"fleet-{rows['awq-00000'].id}/update", {"status": "SUCCEEDED"})
        assert kind == "accepted" and started.state(rows["awq-00000"].id) == "SUCCEEDED"


def test_a_start_that_loses_the_race_to_an_abort_is_told_there_is_nothing(
    offered: tuple[Session, int],
) -> None:
    # Given a device whose start-next was answered from the state before an abort committed
    session, update_id = offered
    device = JobsDevice(session)
    topic = parse_request_topic(f"$aws/things/{THING}/jobs/start-next")
    assert topic is not None
    out = device.gateway.handle(session, [(topic, b'{"clientToken": "late"}')], now=1_800_000_000.0)
    session.rollback()  # the gateway's view is discarded, as when the abort's sweep commits first
    rollout = session.get_one(DeviceUpdate, update_id).rollout_id
    stop_rollout(session, session.get_one(Rollout, rollout), RolloutEvent.ABORT, reason="t", actor="t")
    session.commit()
    # When its report is applied and the reply is built
    device.applier.apply(session, out.reports)
    ((_, reply),) = out.finish(session)
    # Then the reply offers nothing, and the update stays canceled
    assert json.loads(reply) == {"timestamp": 1_800_000_000, "clientToken": "late"}
    assert device.state(update_id) == "CANCELED"


def test_a_report_seq_beyond_32_bits_is_stored(offered: tuple[Session, int]) -> None:
    # Given a device that numbers its reports in microseconds since the epoch
    session, update_id = offered
    seq = 1_800_000_000_000_000
    report = Report(
        update_id=update_id, attempt=1, state=ReportState.DOWNLOADING, seq=seq, running_version="1.0.0"
    )
    # When it is applied, then it is recorded, on SQLite and on PostgreSQL alike
    outcome = ReportApplier().apply(session, [(THING, report)])
    assert outcome.counters["applied"] == 1
    session.expire_all()
    assert session.get_one(DeviceUpdate, update_id).last_seq == seq


def test_a_stop_cancels_an_unstarted_job_and_is_refused_once_started(offered: tuple[Session, int]) -> None:
    session, update_id = offered
    rollout_id = session.get_one(DeviceUpdate, update_id).rollout_id
    device = JobsDevice(session)
    # Given the device started its job, a stop is refused: it runs to its end
    device.ask("start-next", {})
    with pytest.raises(Conflict, match="runs a job it has started to its end"):
        request_stop(session, rollout_id, THING, actor="test")
    assert device.state(update_id) == "DOWNLOADING"


def test_a_stop_before_the_device_takes_its_job_cancels_it(offered: tuple[Session, int]) -> None:
    session, update_id = offered
    rollout_id = session.get_one(DeviceUpdate, update_id).rollout_id
    row = request_stop(session, rollout_id, THING, actor="test")
    assert str(row.state) == "CANCELED" and row.error_code == "canceled"
    assert "execution" not in JobsDevice(session).ask("start-next", {})[1]
