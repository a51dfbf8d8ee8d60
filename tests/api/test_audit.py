"""The audit log: every write through the API, and the engine's and the CLI's own actions, with actor,
token, target and outcome; read-only through the API."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from orchestrator.models import AuditEntry
from orchestrator.services.token_service import create_token, revoke_token
from tests.api.conftest import assert_error, upload
from tests.factories import add_devices


def _audit(client: TestClient, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    response = client.get("/v1/audit", headers=headers, params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_operator_actions_are_audited_with_who_what_and_how_it_ended(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], session: Session
) -> None:
    add_devices(session, 3)
    # When an operator uploads firmware, starts a rollout, pauses it twice and tags a device,
    # and a viewer tries to abort it
    firmware_id = upload(client, operator).json()["id"]
    body = {"name": "r", "firmware_id": firmware_id, "target": {"model": "sensor-v2"}}
    rollout_id = client.post("/v1/rollouts", headers=operator, json=body).json()["id"]
    assert client.post(f"/v1/rollouts/{rollout_id}/pause", headers=operator).status_code == 200
    assert client.post(f"/v1/rollouts/{rollout_id}/pause", headers=operator).status_code == 409
    client.patch("/v1/devices/dev-00001/tags", headers=operator, json={"add": ["pilot"]})
    assert client.post(f"/v1/rollouts/{rollout_id}/abort", headers=viewer).status_code == 403
    # Then each is an entry, newest first, naming the token, the target and the outcome
    entries = _audit(client, viewer)
    seen = [(e["action"], e["target_id"], e["outcome"], e["token_name"]) for e in entries]
    assert seen[:6] == [
        ("rollout.abort", str(rollout_id), "forbidden", "dashboard"),
        ("device.tag", "dev-00001", "ok", "ops"),
        ("rollout.pause", str(rollout_id), "illegal_transition", "ops"),
        ("rollout.pause", str(rollout_id), "ok", "ops"),
        ("rollout.create", str(rollout_id), "ok", "ops"),
        ("firmware.upload", str(firmware_id), "ok", "ops"),
    ]
    refused = entries[0]
    assert refused["actor"] == "api:dashboard" and refused["role"] == "viewer" and refused["status"] == 403
    assert "operator role" in refused["detail"]["message"]
    # and the log filters by action family, target and outcome
    assert {e["action"] for e in _audit(client, viewer, action="rollout.*")} == {
        "rollout.create",
        "rollout.pause",
        "rollout.abort",
    }
    by_target = _audit(client, viewer, target_kind="rollout", target_id=str(rollout_id), outcome="ok")
    assert [e["action"] for e in by_target] == ["rollout.pause", "rollout.create"]


def test_a_request_without_a_valid_token_is_logged_not_stored(
    client: TestClient, viewer: dict[str, str]
) -> None:
    # Strangers must not be able to grow the audit table: a 401 leaves no row
    for _ in range(3):
        assert (
            client.post("/v1/rollouts/1/pause", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
    assert _audit(client, viewer, action="rollout.pause") == []


def test_tokens_made_outside_the_api_are_audited_too(
    client: TestClient, viewer: dict[str, str], session: Session
) -> None:
    token, _secret = create_token(session, name="ci-bot", role="operator", actor="cli:root")
    revoke_token(session, token.id, actor="cli:root")
    revoke_token(session, token.id, actor="cli:root")  # idempotent: one entry
    entries = _audit(client, viewer, target_kind="token", target_id=str(token.id))
    assert [(e["action"], e["actor"]) for e in entries] == [
        ("token.revoke", "cli:root"),
        ("token.create", "cli:root"),
    ]


def test_the_audit_log_cannot_be_changed_through_the_api(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], session: Session
) -> None:
    assert client.post("/v1/rollouts/9/pause", headers=operator).status_code == 404
    before = session.query(AuditEntry).count()
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert client.request(method, "/v1/audit", headers=operator).status_code == 405
    assert session.query(AuditEntry).count() == before
    assert_error(client.get("/v1/audit", headers={}), 401, "unauthorized")
    assert client.get("/v1/audit", headers=viewer, params={"since": "2026-01-01T00:00:00"}).status_code == 422


def test_the_engines_and_the_schedulers_own_actions_are_audited(
    client: TestClient, operator: dict[str, str], viewer: dict[str, str], session: Session
) -> None:
    from orchestrator.engine.waves import stop_rollout
    from orchestrator.models import Rollout
    from orchestrator.state_machines import RolloutEvent
    from orchestrator.transitions import transition_rollout

    add_devices(session, 2)
    firmware_id = upload(client, operator).json()["id"]
    body = {
        "name": "later",
        "firmware_id": firmware_id,
        "target": {"model": "sensor-v2"},
        "start_at": "2099-01-01T00:00:00Z",
    }
    rollout_id = client.post("/v1/rollouts", headers=operator, json=body).json()["id"]
    rollout = session.get_one(Rollout, rollout_id)
    transition_rollout(session, rollout, RolloutEvent.START, actor="scheduler")
    stop_rollout(session, rollout, RolloutEvent.HALT, reason="wave 0 below success threshold", actor="system")
    session.commit()
    entries = _audit(client, viewer, target_kind="rollout", target_id=str(rollout_id))
    assert [(e["action"], e["actor"]) for e in entries] == [
        ("rollout.halt", "system"),
        ("rollout.start", "scheduler"),
        ("rollout.create", "api:ops"),
    ]
    assert entries[0]["detail"] == {"reason": "wave 0 below success threshold"}
