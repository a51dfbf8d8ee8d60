"""Per-device actions through the API: the answers, the 4xx naming the field, the audit entries."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from orchestrator.models import Device, DeviceUpdate
from tests.api.conftest import assert_error, upload
from tests.factories import add_devices


def _rollout(client: TestClient, operator: dict[str, str], firmware_id: int) -> int:
    body = {"name": "r", "firmware_id": firmware_id, "target": {"model": "sensor-v2"}}
    response = client.post("/v1/rollouts", headers=operator, json=body)
    assert response.status_code == 201, response.text
    rollout_id: int = response.json()["id"]
    return rollout_id


def test_device_actions_answer_with_the_update_or_a_4xx_naming_the_field(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], session: Session
) -> None:
    ids = add_devices(session, 3)
    rollout_id = _rollout(client, operator, upload(client, operator).json()["id"])
    base = f"/v1/rollouts/{rollout_id}/devices"
    # A queued device can be canceled, once
    canceled = client.post(f"{base}/{ids[2]}/cancel", headers=operator)
    assert canceled.status_code == 200, canceled.text
    assert (canceled.json()["state"], canceled.json()["error_code"]) == ("CANCELED", "canceled")
    assert_error(client.post(f"{base}/{ids[2]}/cancel", headers=operator), 409, "conflict", "device_id")
    # Not offered yet: a stop is refused with what to do instead
    refused = assert_error(
        client.post(f"{base}/{ids[1]}/stop", headers=operator), 409, "conflict", "device_id"
    )
    assert "cancel it instead" in refused["message"]
    # A failed transfer is retried as a new attempt
    session.execute(
        update(DeviceUpdate)
        .where(DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.device_id == ids[0])
        .values(state="FAILED", error_code="download_error")
    )
    session.commit()
    retried = client.post(f"{base}/{ids[0]}/retry", headers=operator)
    assert retried.status_code == 200, retried.text
    assert (retried.json()["state"], retried.json()["attempt"]) == ("QUEUED", 2)
    # Unknown rollout, unknown device, bad id, viewer
    assert_error(
        client.post(f"/v1/rollouts/999/devices/{ids[0]}/retry", headers=operator),
        404,
        "not_found",
        "rollout_id",
    )
    assert_error(client.post(f"{base}/ghost-1/retry", headers=operator), 404, "not_found", "device_id")
    assert client.post(f"{base}/bad%20id/retry", headers=operator).status_code == 422
    assert client.post(f"{base}/{ids[0]}/cancel", headers=viewer).status_code == 403
    # and every one of these is in the audit log with the rollout it was about
    entries = client.get("/v1/audit", headers=viewer, params={"action": "device.*"}).json()["items"]
    summary = [(e["action"], e["target_id"], e["outcome"]) for e in entries]
    assert ("device.retry", ids[0], "ok") in summary and ("device.stop", ids[1], "conflict") in summary
    assert all(e["detail"]["rollout_id"] in (rollout_id, 999) for e in entries)


def test_rollout_devices_filter_on_the_update_and_the_device_and_page_through_any_size(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], session: Session
) -> None:
    ids = add_devices(session, 250)
    session.execute(update(Device).where(Device.id.in_(ids[:40])).values(online=False))
    session.commit()
    client.post("/v1/devices/tags", headers=operator, json={"device_ids": ids[:10], "add": ["pilot"]})
    rollout_id = _rollout(client, operator, upload(client, operator).json()["id"])
    session.execute(
        update(DeviceUpdate)
        .where(DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.device_id.in_(ids[5:15]))
        .values(state="FAILED", error_code="checksum")
    )
    session.commit()
    url = f"/v1/rollouts/{rollout_id}/devices"

    def listed(**params: object) -> list[str]:
        response = client.get(url, headers=viewer, params=params)
        assert response.status_code == 200, response.text
        return [d["device_id"] for d in response.json()["items"]]

    assert listed(state="FAILED", tag="pilot") == ids[5:10]
    assert listed(error_code="checksum", online="false") == ids[5:15]
    assert listed(q="0012") == [i for i in ids if "0012" in i]
    # Paging: 250 devices in pages of 100, none twice, in id order
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, object] = {"limit": 100}
        if cursor:
            params["cursor"] = cursor
        body = client.get(url, headers=viewer, params=params).json()
        seen += [d["device_id"] for d in body["items"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == ids
    # A device's page carries its timeline
    detail = client.get(f"/v1/devices/{ids[0]}", headers=viewer, params={"events": 5}).json()
    assert detail["updates"][0]["rollout_id"] == rollout_id
    assert [e["name"] for e in detail["events"]][:1] == ["device_tagged"]
    assert client.get("/v1/devices", headers=viewer, params={"q": "0024"}).json()["items"][0]["id"] == ids[24]
