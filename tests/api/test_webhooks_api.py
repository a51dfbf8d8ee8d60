"""Webhook endpoints through the API: register (secret shown once), list, deactivate, deliveries."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from orchestrator.webhooks import sign, verify
from tests.api.conftest import assert_error


def test_an_endpoint_is_registered_listed_and_deactivated(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str]
) -> None:
    body = {
        "url": "https://hooks.example.com/fleet",
        "events": ["device_update", "rollout"],
        "description": "ops",
    }
    created = client.post("/v1/webhooks", headers=operator, json=body)
    assert created.status_code == 201, created.text
    hook = created.json()
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["device_update", "rollout"]
    listed = client.get("/v1/webhooks", headers=viewer).json()
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
    assert client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=viewer).json()["items"] == []
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=viewer).status_code == 403
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=operator).status_code == 204
    assert client.get("/v1/webhooks", headers=viewer).json()[0]["active"] is False
    # the secret signs like a receiver checks it
    payload = b'{"type":"rollout.state"}'
    assert verify(hook["secret"], payload, sign(hook["secret"], payload))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "http://hooks.example.com/x", "events": ["rollout"]}, "url"),
        ({"url": "ftp://hooks.example.com/x", "events": ["rollout"]}, "url"),
        ({"url": "https://user:pw@hooks.example.com/x", "events": ["rollout"]}, "url"),
        ({"url": "https://hooks.example.com/x", "events": ["wave"]}, "events"),
        ({"url": "https://hooks.example.com/x", "events": []}, "events"),
        ({"url": "http://127.0.0.1:8080/x", "events": ["rollout"]}, "url"),
        ({"url": "https://10.0.0.7/x", "events": ["rollout"]}, "url"),
        ({"url": "https://169.254.169.254/latest", "events": ["rollout"]}, "url"),
    ],
)
def test_bad_endpoints_are_refused_naming_the_field(
    client: TestClient, operator: dict[str, str], body: dict[str, object], field: str
) -> None:
    response = client.post("/v1/webhooks", headers=operator, json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["field"]


def test_deliveries_of_an_unknown_endpoint_or_a_bad_status_are_4xx(
    client: TestClient, viewer: dict[str, str]
) -> None:
    assert_error(client.get("/v1/webhooks/77/deliveries", headers=viewer), 404, "not_found", "webhook_id")
