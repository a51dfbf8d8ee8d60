"""Rollout routes: create (+ start), list, status, per-device list, events, pause/resume/abort."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis
import time_machine
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from orchestrator.models import DeviceUpdate, Rollout, Wave, utcnow
from orchestrator.services import rollout_service
from orchestrator.state_machines import RolloutState, UpdateEvent, UpdateState
from orchestrator.transitions import transition_update
from tests.api.conftest import assert_error, sent_tasks, upload
from tests.factories import add_devices


@pytest.fixture
def firmware_id(client: TestClient, operator: dict[str, str], session: Session) -> int:
    """30 sensor-v2 devices on 1.0.0, 2 already on 1.1.0, and the sensor-v2 1.1.0 image."""
    add_devices(session, 30)
    add_devices(session, 2, version="1.1.0", prefix="current-")
    response = upload(client, operator)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def create(client: TestClient, headers: dict[str, str], fw: int, **extra: Any) -> Any:
    """POST /v1/rollouts for every sensor-v2 device, superseding earlier rollouts of these tests;
    ``extra`` replaces or adds body fields."""
    body = {"name": "r", "firmware_id": fw, "target": {"model": "sensor-v2"}, "supersede": True, **extra}
    return client.post("/v1/rollouts", headers=headers, json=body)


def states(session: Session, rollout_id: int) -> dict[str, int]:
    rows = session.execute(
        select(DeviceUpdate.state, func.count())
        .where(DeviceUpdate.rollout_id == rollout_id)
        .group_by(DeviceUpdate.state)
    ).tuples()
    result = {str(state): count for state, count in rows}
    session.commit()
    return result


def test_create_starts_at_once(
    client: TestClient,
    operator: dict[str, str],
    firmware_id: int,
    session: Session,
    celery_to_test_redis: redis.Redis,
) -> None:
    response = create(client, operator, firmware_id, policy={"waves": ["10%", "100%"], "max_in_flight": 5})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "RUNNING" and body["total"] == 32 and body["started_at"]
    assert body["policy"]["max_in_flight"] == 5
    rollout = session.get(Rollout, body["id"])
    assert rollout is not None and rollout.status == RolloutState.RUNNING
    assert states(session, body["id"]) == {"PENDING": 30, "SKIPPED": 2}
    sizes = session.scalars(select(Wave.size).where(Wave.rollout_id == body["id"]).order_by(Wave.index)).all()
    session.commit()
    assert sizes == [3, 27]
    assert ("fleet.kick", f"({body['id']},)") in sent_tasks(celery_to_test_redis)


def test_create_with_future_start_stays_scheduled(
    client: TestClient,
    operator: dict[str, str],
    firmware_id: int,
    celery_to_test_redis: redis.Redis,
) -> None:
    later = (utcnow() + timedelta(hours=1)).isoformat()
    body = create(client, operator, firmware_id, start_at=later).json()
    assert body["status"] == "SCHEDULED" and body["start_at"] and body["started_at"] is None
    assert sent_tasks(celery_to_test_redis) == []
    earlier = (utcnow() - timedelta(minutes=1)).isoformat()
    assert create(client, operator, firmware_id, start_at=earlier).json()["status"] == "RUNNING"


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"name": ""}, "name"),
    ({"firmware_id": "x"}, "firmware_id"),
    ({"firmware_id": 0}, "firmware_id"),
    ({"target": {}}, "target"),
    ({"target": {"device_ids": []}}, "target.device_ids"),
    ({"target": {"device_ids": ["bad/id"]}}, "target"),
    ({"target": {"model": "x\u0000"}}, "target"),
    ({"target": {"model": "sensor-v2", "zone": 1}}, "target.zone"),
    ({"policy": {"waves": ["abc"]}}, "policy.waves"),
    ({"policy": {"waves": []}}, "policy.waves"),
    ({"policy": {"success_threshold": 2}}, "policy.success_threshold"),
    ({"policy": {"max_attempts": 0}}, "policy.max_attempts"),
    ({"policy": {"bogus": 1}}, "policy.bogus"),
    ({"start_at": "2030-01-01T00:00:00"}, "start_at"),
    ({"start_at": "tomorrow"}, "start_at"),
    ({"extra": True}, "extra"),
]


def test_create_rejects_bad_bodies(client: TestClient, operator: dict[str, str], firmware_id: int) -> None:
    for change, field in BAD_BODIES:
        assert_error(create(client, operator, firmware_id, **change), 422, "invalid_input", field)


def test_create_names_missing_fields(client: TestClient, operator: dict[str, str]) -> None:
    response = client.post("/v1/rollouts", headers=operator, json={"name": "r", "firmware_id": 1})
    assert_error(response, 422, "invalid_input", "target")


def test_create_reference_errors(client: TestClient, operator: dict[str, str], firmware_id: int) -> None:
    assert_error(create(client, operator, 999), 404, "not_found", "firmware_id")
    response = create(
        client, operator, firmware_id, target={"model": "sensor-v2", "labels": {"site": "mars"}}
    )
    assert_error(response, 422, "invalid_input", "target")
    response = create(client, operator, firmware_id, target={"device_ids": ["dev-00000", "ghost-1"]})
    assert_error(response, 422, "invalid_input", "target.device_ids")


def test_list_newest_first_with_status_filter_and_cursor(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], firmware_id: int
) -> None:
    later = (utcnow() + timedelta(hours=1)).isoformat()
    ids = [create(client, operator, firmware_id).json()["id"] for _ in range(3)]
    scheduled = create(client, operator, firmware_id, start_at=later).json()["id"]
    listed = client.get("/v1/rollouts", headers=viewer).json()
    assert [r["id"] for r in listed["items"]] == [scheduled, *ids[::-1]] and listed["next_cursor"] is None
    running = client.get("/v1/rollouts?status=RUNNING&limit=2", headers=viewer).json()
    assert [r["id"] for r in running["items"]] == [ids[2], ids[1]]
    rest = client.get(f"/v1/rollouts?status=RUNNING&limit=2&cursor={running['next_cursor']}", headers=viewer)
    assert [r["id"] for r in rest.json()["items"]] == [ids[0]] and rest.json()["next_cursor"] is None
    only = client.get("/v1/rollouts?status=SCHEDULED", headers=viewer).json()
    assert [r["id"] for r in only["items"]] == [scheduled]


def test_status_summary(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], firmware_id: int
) -> None:
    rollout_id = create(client, operator, firmware_id).json()["id"]
    body = client.get(f"/v1/rollouts/{rollout_id}", headers=viewer).json()
    assert body["status"] == "RUNNING" and body["name"] == "r"
    assert body["counts"] == {"PENDING": 30, "SKIPPED": 2}
    assert body["percent"] == pytest.approx(100 * 2 / 32, abs=0.1)
    assert [(w["index"], w["size"], w["done"]) for w in body["waves"]] == [(0, 1, 0), (1, 2, 0), (2, 27, 0)]
    # no worker runs here, so no wave has opened yet
    assert [(w["started_at"], w["finished_at"]) for w in body["waves"]] == [(None, None)] * 3


def test_devices_of_a_rollout(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], firmware_id: int
) -> None:
    rollout_id = create(client, operator, firmware_id).json()["id"]
    url = f"/v1/rollouts/{rollout_id}/devices"
    skipped = client.get(f"{url}?state=SKIPPED", headers=viewer).json()
    assert [(d["device_id"], d["error_code"], d["wave_index"]) for d in skipped["items"]] == [
        ("current-00000", "already_on_target", None),
        ("current-00001", "already_on_target", None),
    ]
    seen: list[str] = []
    cursor = ""
    while True:
        page = client.get(f"{url}?state=PENDING&limit=7&cursor={cursor}", headers=viewer).json()
        seen += [d["device_id"] for d in page["items"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert seen == [f"dev-{i:05d}" for i in range(30)]
    first = client.get(f"{url}?limit=1", headers=viewer).json()["items"][0]
    assert first["device_id"] == "current-00000"
    assert first["running_version"] == "1.1.0" and first["online"] is True


def test_progress_over_time_is_replayed_from_events(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], firmware_id: int, session: Session
) -> None:
    # Given a rollout that started 5 minutes ago, where three devices were offered in the first
    # minute, one succeeded in the second, one failed in the third, and one is still downloading
    rollout_id = create(client, operator, firmware_id).json()["id"]
    began = utcnow() - timedelta(minutes=5)
    session.execute(update(Rollout).where(Rollout.id == rollout_id).values(started_at=began))
    updates = session.scalars(
        select(DeviceUpdate)
        .where(DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.state == "PENDING")
        .order_by(DeviceUpdate.device_id)
        .limit(3)
    ).all()
    steps = [
        (0, UpdateEvent.ENQUEUE),
        (0, UpdateEvent.OFFER),
        (1, UpdateEvent.ENQUEUE),
        (1, UpdateEvent.OFFER),
        (2, UpdateEvent.ENQUEUE),
        (2, UpdateEvent.OFFER),
        (0, UpdateEvent.REPORT_DOWNLOADING),
        (0, UpdateEvent.REPORT_SUCCEEDED),
        (1, UpdateEvent.REPORT_FAILED),
        (2, UpdateEvent.REPORT_DOWNLOADING),
    ]
    minute = {UpdateEvent.REPORT_SUCCEEDED: 1.5, UpdateEvent.REPORT_FAILED: 2.5}
    for index, event in steps:
        with time_machine.travel(began + timedelta(minutes=minute.get(event, 0.5)), tick=False):
            transition_update(session, updates[index], event)
    session.commit()

    # When the portal asks for the progress by minute
    body = client.get(f"/v1/rollouts/{rollout_id}/progress?bucket_s=60", headers=viewer).json()

    # Then each minute's end shows what was true then
    assert body["bucket_s"] == 60
    points = [(p["succeeded"], p["failed"], p["in_flight"]) for p in body["points"]]
    assert points[:4] == [(0, 0, 0), (0, 0, 3), (1, 0, 2), (1, 1, 1)]
    assert points[-1] == (1, 1, 1) and len(points) in (6, 7)
    # and a long rollout gets wider buckets rather than thousands of points
    session.execute(
        update(Rollout).where(Rollout.id == rollout_id).values(started_at=utcnow() - timedelta(days=3))
    )
    session.commit()
    wide = client.get(f"/v1/rollouts/{rollout_id}/progress", headers=viewer).json()
    assert wide["bucket_s"] == 1800 and len(wide["points"]) <= 242


def test_events_newest_first(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], firmware_id: int
) -> None:
    rollout_id = create(client, operator, firmware_id).json()["id"]
    client.post(f"/v1/rollouts/{rollout_id}/pause", headers=operator)
    url = f"/v1/rollouts/{rollout_id}/events"
    first = client.get(f"{url}?limit=2", headers=viewer).json()
    assert [e["name"] for e in first["items"]] == ["rollout_pause", "rollout_start"]
    assert first["items"][0]["detail"]["actor"] == "api:ops" and first["items"][0]["kind"] == "operator"
    rest = client.get(f"{url}?cursor={first['next_cursor']}", headers=viewer).json()
    names = [e["name"] for e in rest["items"]]
    assert names[-1] == "rollout_created" and names.count("skip") == 2 and rest["next_cursor"] is None
    ids = [e["id"] for e in first["items"] + rest["items"]]
    assert ids == sorted(ids, reverse=True)


def test_pause_resume_abort(
    client: TestClient,
    operator: dict[str, str],
    firmware_id: int,
    session: Session,
    celery_to_test_redis: redis.Redis,
) -> None:
    rollout_id = create(client, operator, firmware_id).json()["id"]
    celery_to_test_redis.flushdb()
    paused = client.post(f"/v1/rollouts/{rollout_id}/pause", headers=operator)
    assert paused.status_code == 200 and paused.json()["status"] == "PAUSED"
    assert ("fleet.kick", f"({rollout_id},)") in sent_tasks(celery_to_test_redis)
    resumed = client.post(f"/v1/rollouts/{rollout_id}/resume", headers=operator)
    assert resumed.status_code == 200 and resumed.json()["status"] == "RUNNING"
    assert ("fleet.kick", f"({rollout_id},)") in sent_tasks(celery_to_test_redis)
    aborted = client.post(f"/v1/rollouts/{rollout_id}/abort", headers=operator)
    assert aborted.status_code == 200
    body = aborted.json()
    assert body["status"] == "ABORTED" and body["reason"] == "aborted by operator" and body["finished_at"]
    assert states(session, rollout_id) == {"CANCELED": 30, "SKIPPED": 2}
    rollout = session.get(Rollout, rollout_id)
    session.commit()
    assert rollout is not None and rollout.status == RolloutState.ABORTED


ILLEGAL: list[tuple[RolloutState | None, str]] = [
    (None, "resume"),  # SCHEDULED
    (None, "pause"),
    (RolloutState.COMPLETED, "resume"),
    (RolloutState.COMPLETED, "pause"),
    (RolloutState.COMPLETED, "abort"),
    (RolloutState.ABORTED, "abort"),
    (RolloutState.RUNNING, "resume"),
    (RolloutState.PAUSED, "pause"),
]


def test_illegal_actions_are_409(
    client: TestClient, operator: dict[str, str], firmware_id: int, session: Session
) -> None:
    later = (utcnow() + timedelta(hours=1)).isoformat()
    for status, action in ILLEGAL:
        rollout_id = create(client, operator, firmware_id, start_at=later).json()["id"]
        if status is not None:
            session.execute(update(Rollout).where(Rollout.id == rollout_id).values(status=status))
            session.commit()
        before = states(session, rollout_id)
        response = client.post(f"/v1/rollouts/{rollout_id}/{action}", headers=operator)
        assert_error(response, 409, "illegal_transition")
        assert states(session, rollout_id) == before
        rollout = session.get(Rollout, rollout_id)
        session.commit()
        assert rollout is not None and rollout.status == (status or RolloutState.SCHEDULED)


ERRORS: list[tuple[str, str, int, str, str | None]] = [
    ("get", "/v1/rollouts/999", 404, "not_found", "rollout_id"),
    ("get", "/v1/rollouts/999/devices", 404, "not_found", "rollout_id"),
    ("get", "/v1/rollouts/999/events", 404, "not_found", "rollout_id"),
    ("post", "/v1/rollouts/999/pause", 404, "not_found", "rollout_id"),
    ("post", "/v1/rollouts/999/resume", 404, "not_found", "rollout_id"),
    ("post", "/v1/rollouts/999/abort", 404, "not_found", "rollout_id"),
    ("get", "/v1/rollouts/abc", 422, "invalid_input", "rollout_id"),
    ("get", "/v1/rollouts/1.5/devices", 422, "invalid_input", "rollout_id"),
    ("post", "/v1/rollouts/-1/abort", 422, "invalid_input", "rollout_id"),
    ("get", "/v1/rollouts?status=DONE", 422, "invalid_input", "status"),
    ("get", "/v1/rollouts?status=running", 422, "invalid_input", "status"),
    ("get", "/v1/rollouts?limit=0", 422, "invalid_input", "limit"),
    ("get", "/v1/rollouts?cursor=eyJ4Ijox", 422, "invalid_input", "cursor"),
    ("get", "/v1/rollouts/1/devices?state=LOST", 422, "invalid_input", "state"),
    ("get", "/v1/rollouts/1/events?limit=1001", 422, "invalid_input", "limit"),
    ("get", "/v1/rollouts/999/progress", 404, "not_found", "rollout_id"),
    ("get", "/v1/rollouts/1/progress?bucket_s=5", 422, "invalid_input", "bucket_s"),
    ("delete", "/v1/rollouts/1", 405, "method_not_allowed", None),
    ("get", "/v1/nothing-here", 404, "not_found", None),
]


def test_rollout_errors(client: TestClient, operator: dict[str, str], firmware_id: int) -> None:
    create(client, operator, firmware_id)  # rollout 1 exists
    for method, path, status, code, field in ERRORS:
        assert_error(client.request(method, path, headers=operator), status, code, field)


def test_lost_optimistic_lock_race_is_409(
    client: TestClient, operator: dict[str, str], firmware_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rollout_id = create(client, operator, firmware_id).json()["id"]

    def concurrent_writer(*args: Any, **kwargs: Any) -> Rollout:
        raise StaleDataError(
            "UPDATE statement on table 'rollouts' expected to update 1 row(s); 0 were matched."
        )

    monkeypatch.setattr(rollout_service, "pause_rollout", concurrent_writer)
    response = client.post(f"/v1/rollouts/{rollout_id}/pause", headers=operator)
    assert_error(response, 409, "concurrent_update")


def test_overlapping_rollouts_conflict_unless_superseding(
    client: TestClient, operator: dict[str, str], firmware_id: int, session: Session
) -> None:
    # Given a running rollout over dev-00000..dev-00009 with three of them already offered
    first = create(client, operator, firmware_id, target={"device_ids": [f"dev-{i:05d}" for i in range(10)]})
    first_id = first.json()["id"]
    started = session.scalars(
        select(DeviceUpdate).where(DeviceUpdate.rollout_id == first_id).order_by(DeviceUpdate.id).limit(3)
    ).all()
    for du in started:  # as the wave start and the offer step leave them
        transition_update(session, du, UpdateEvent.ENQUEUE)
        transition_update(session, du, UpdateEvent.OFFER)
    session.commit()
    # When another rollout targets an overlapping set without superseding
    body = {
        "name": "second",
        "firmware_id": firmware_id,
        "target": {"device_ids": ["dev-00001", "dev-00005", "dev-00020"]},
    }
    response = client.post("/v1/rollouts", headers=operator, json=body)
    # Then it is refused, naming the devices, and nothing was written
    assert_error(response, 409, "conflict", "target")
    message = response.json()["message"]
    assert "dev-00001" in message and "dev-00005" in message and "dev-00020" not in message
    assert f"rollout(s) {first_id}" in message
    assert session.scalar(select(func.count()).select_from(Rollout)) == 1
    # When it supersedes
    second = client.post("/v1/rollouts", headers=operator, json={**body, "supersede": True})
    assert second.status_code == 201, second.text
    # Then the older update that had not started is canceled, the started one is left to finish
    old = {
        du.device_id: du
        for du in session.scalars(select(DeviceUpdate).where(DeviceUpdate.rollout_id == first_id))
    }
    session.commit()
    assert old["dev-00001"].state == UpdateState.OFFERED
    assert old["dev-00005"].state == UpdateState.CANCELED and old["dev-00005"].error_code == "superseded"
    assert old["dev-00002"].state == UpdateState.OFFERED and old["dev-00006"].state != UpdateState.CANCELED
    events = client.get(f"/v1/rollouts/{first_id}/events", headers=operator).json()["items"]
    superseded = [e for e in events if e["name"] == "rollout_superseded"]
    assert (
        superseded and superseded[0]["detail"]["canceled"] == 1 and superseded[0]["detail"]["finishing"] == 1
    )
