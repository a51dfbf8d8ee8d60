"""Policy through the API: operator tags, saved groups, version constraints, windows, rate, end time,
continuous rollouts, and the firmware lifecycle (deprecate, delete)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.ingest.inventory import apply_inventory
from orchestrator.models import Device, Event
from orchestrator.protocol import DeviceInfo
from tests.api.conftest import assert_error, upload
from tests.factories import add_devices


def _rollout(client: TestClient, headers: dict[str, str], firmware_id: int, **body: Any) -> Any:
    return client.post(
        "/v1/rollouts", headers=headers, json={"name": "r", "firmware_id": firmware_id, **body}
    )


# ---------------------------------------------------------------- tags
def test_operator_tags_are_set_removed_filtered_and_survive_what_devices_report(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], session: Session
) -> None:
    ids = add_devices(session, 4)
    # When an operator tags three devices and untags one of them
    response = client.post(
        "/v1/devices/tags", headers=operator, json={"device_ids": ids[:3], "add": ["pilot", "berlin_2"]}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"devices": 3}
    one = client.patch(f"/v1/devices/{ids[2]}/tags", headers=operator, json={"remove": ["pilot"]})
    assert one.status_code == 200 and one.json()["tags"] == ["berlin_2"]
    # Then the device list filters on tags (an underscore is not a wildcard)
    listed = client.get("/v1/devices", headers=viewer, params={"tag": "pilot"}).json()["items"]
    assert [d["id"] for d in listed] == ids[:2]
    assert client.get("/v1/devices", headers=viewer, params={"tag": "berlin12"}).json()["items"] == []
    # When the device reports its labels again, the operator's tags stay
    info = DeviceInfo(model="sensor-v2", running_version="1.0.0", labels={"site": "x"}, slot="a")
    apply_inventory(session, {ids[0]: info}, {ids[0]: True})
    session.expire_all()
    assert session.get_one(Device, ids[0]).tags == ["berlin_2", "pilot"]
    # and every change is on the record
    events = session.scalars(select(Event).where(Event.name == "device_tagged")).all()
    assert len(events) == 4 and events[0].detail is not None and events[0].detail["actor"].startswith("api:")


def test_bad_tag_requests_name_the_field(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], session: Session
) -> None:
    (device,) = add_devices(session, 1)
    bad = client.patch(f"/v1/devices/{device}/tags", headers=operator, json={"add": ["no spaces"]})
    assert bad.status_code == 422 and "add" in bad.json()["field"]
    assert_error(
        client.patch(f"/v1/devices/{device}/tags", headers=operator, json={}), 422, "invalid_input", "add"
    )
    assert_error(
        client.post("/v1/devices/tags", headers=operator, json={"device_ids": ["ghost-1"], "add": ["x"]}),
        404,
        "not_found",
        "device_ids",
    )
    assert client.patch(f"/v1/devices/{device}/tags", headers=viewer, json={"add": ["x"]}).status_code == 403


# ---------------------------------------------------------------- groups
def test_a_rollout_targets_a_saved_group_with_a_version_constraint(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], session: Session
) -> None:
    # Given devices on three versions, some tagged
    old = add_devices(session, 3, prefix="old-", version="0.9.0")
    mid = add_devices(session, 3, prefix="mid-", version="1.0.4")
    current = add_devices(session, 1, prefix="cur-", version="1.1.0")
    tagged = [old[0], mid[0], mid[1], current[0]]
    client.post("/v1/devices/tags", headers=operator, json={"device_ids": tagged, "add": ["pilot"]})
    firmware_id = upload(client, operator).json()["id"]  # sensor-v2 1.1.0
    # When a group selects tagged sensors and a rollout targets it
    group = {"name": "pilots", "filter": {"model": "sensor-v2", "tags": ["pilot"], "versions": ">=1.0,<1.1"}}
    created = client.post("/v1/groups", headers=operator, json=group)
    assert created.status_code == 201, created.text
    assert created.json()["devices"] == 4
    assert [g["name"] for g in client.get("/v1/groups", headers=viewer).json()] == ["pilots"]
    response = _rollout(client, operator, firmware_id, target={"group": "pilots"})
    assert response.status_code == 201, response.text
    rollout = response.json()
    # Then the group's filter is copied in, and each device outside the constraint is listed as skipped
    assert rollout["target"]["tags"] == ["pilot"] and rollout["target"]["versions"] == ">=1.0,<1.1"
    detail = client.get(f"/v1/rollouts/{rollout['id']}", headers=viewer).json()
    assert detail["counts"] == {"PENDING": 2, "SKIPPED": 2}
    assert detail["skipped"] == {"incompatible": 1, "already_on_target": 1}
    skipped = client.get(
        f"/v1/rollouts/{rollout['id']}/devices", headers=viewer, params={"state": "SKIPPED"}
    ).json()["items"]
    assert {(d["device_id"], d["error_code"]) for d in skipped} == {
        (old[0], "incompatible"),
        (current[0], "already_on_target"),
    }
    # And deleting the group leaves the rollout as it was
    assert client.delete("/v1/groups/pilots", headers=operator).status_code == 204
    assert_error(client.get("/v1/groups/pilots", headers=viewer), 404, "not_found", "name")
    assert client.get(f"/v1/rollouts/{rollout['id']}", headers=viewer).json()["total"] == 4


def test_group_and_target_mistakes_are_4xx_naming_the_field(
    client: TestClient, operator: dict[str, str], session: Session
) -> None:
    add_devices(session, 2)
    firmware_id = upload(client, operator).json()["id"]
    group = {"name": "g1", "filter": {"model": "sensor-v2"}}
    assert client.post("/v1/groups", headers=operator, json=group).status_code == 201
    assert_error(client.post("/v1/groups", headers=operator, json=group), 409, "already_exists", "name")
    bad_versions = {"name": "g2", "filter": {"versions": "about 1.0"}}
    response = client.post("/v1/groups", headers=operator, json=bad_versions)
    assert response.status_code == 422 and "versions" in response.json()["field"]
    assert_error(
        _rollout(client, operator, firmware_id, target={"group": "nope"}), 404, "not_found", "target.group"
    )
    both = _rollout(client, operator, firmware_id, target={"group": "g1", "device_ids": ["dev-00000"]})
    assert both.status_code == 422 and "target" in both.json()["field"]


# ---------------------------------------------------------------- policy fields
@pytest.mark.parametrize(
    ("policy", "field_part"),
    [
        ({"windows": [{"cron": "0 2 * * *"}]}, "windows"),
        ({"windows": [{"cron": "0 2 * * *", "duration_s": 600, "timezone": "Nowhere/City"}]}, "windows"),
        ({"rate": {"initial_per_minute": 0}}, "rate"),
        ({"rate": {"initial_per_minute": 5, "every_s": 10, "every_succeeded": 2}}, "rate"),
        ({"end_at": "2026-12-03T10:00:00"}, "end_at"),
    ],
)
def test_a_malformed_policy_is_422_naming_the_field(
    client: TestClient, operator: dict[str, str], session: Session, policy: dict[str, Any], field_part: str
) -> None:
    add_devices(session, 1)
    firmware_id = upload(client, operator).json()["id"]
    response = _rollout(client, operator, firmware_id, target={"model": "sensor-v2"}, policy=policy)
    assert response.status_code == 422, response.text
    assert field_part in response.json()["field"]


def test_windows_rate_and_end_time_are_stored_and_shown(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], session: Session
) -> None:
    add_devices(session, 3)
    firmware_id = upload(client, operator).json()["id"]
    policy = {
        "windows": [{"cron": "0 2 * * mon-fri", "duration_s": 7200, "timezone": "Europe/Berlin"}],
        "rate": {"initial_per_minute": 10, "factor": 2, "every_succeeded": 50, "max_per_minute": 200},
        "end_at": "2030-01-01T00:00:00Z",
    }
    response = _rollout(client, operator, firmware_id, target={"model": "sensor-v2"}, policy=policy)
    assert response.status_code == 201, response.text
    rollout = response.json()
    assert rollout["policy"]["windows"][0]["timezone"] == "Europe/Berlin"
    assert rollout["policy"]["end_at"].startswith("2030-01-01T00:00:00")
    pacing = client.get(f"/v1/rollouts/{rollout['id']}", headers=viewer).json()["pacing"]
    assert pacing["rate_per_minute"] == 10 and pacing["window_open"] in (True, False)
    assert pacing["next_window_at"] is not None and pacing["end_at"].startswith("2030")


def test_a_continuous_rollout_may_start_with_no_device_yet(
    client: TestClient, operator: dict[str, str], session: Session
) -> None:
    add_devices(session, 1, version="1.1.0")  # already current: nothing to do today
    firmware_id = upload(client, operator).json()["id"]
    target = {"model": "sensor-v2", "tags": ["later"]}
    assert_error(_rollout(client, operator, firmware_id, target=target), 422, "invalid_input", "target")
    response = _rollout(client, operator, firmware_id, target=target, policy={"continuous": True})
    assert response.status_code == 201, response.text
    assert response.json()["total"] == 0


# ---------------------------------------------------------------- firmware lifecycle
def test_deprecated_firmware_takes_no_new_rollout_and_used_firmware_cannot_be_deleted(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], session: Session
) -> None:
    add_devices(session, 2)
    firmware_id = upload(client, operator).json()["id"]
    assert _rollout(client, operator, firmware_id, target={"model": "sensor-v2"}).status_code == 201
    # A used image cannot be deleted
    assert_error(
        client.delete(f"/v1/firmware/{firmware_id}", headers=operator), 409, "conflict", "firmware_id"
    )
    # Deprecating is for operators, idempotent, and stops new rollouts
    assert client.post(f"/v1/firmware/{firmware_id}/deprecate", headers=viewer).status_code == 403
    first = client.post(f"/v1/firmware/{firmware_id}/deprecate", headers=operator)
    again = client.post(f"/v1/firmware/{firmware_id}/deprecate", headers=operator)
    assert first.status_code == 200 and first.json()["deprecated_at"] == again.json()["deprecated_at"]
    assert_error(
        _rollout(client, operator, firmware_id, target={"model": "sensor-v2"}), 409, "conflict", "firmware_id"
    )
    assert client.get(f"/v1/firmware/{firmware_id}", headers=viewer).json()["deprecated_at"] is not None


def test_unused_firmware_is_deleted_with_its_file(
    client: TestClient, operator: dict[str, str], session: Session
) -> None:
    from orchestrator.models import Firmware

    firmware_id = upload(client, operator).json()["id"]
    path = session.get_one(Firmware, firmware_id).storage_path
    assert client.delete(f"/v1/firmware/{firmware_id}", headers=operator).status_code == 204
    assert_error(client.get(f"/v1/firmware/{firmware_id}", headers=operator), 404, "not_found")
    from pathlib import Path

    assert not Path(path).exists()
    assert session.scalars(select(Event).where(Event.name == "firmware_deleted")).one()
