"""Bearer tokens with roles: 401 without a valid token, 403 for a weak role, open routes stay open."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from orchestrator.api.token_cli import token_app
from orchestrator.config import get_settings
from orchestrator.models import ApiToken
from orchestrator.services.token_service import hash_secret
from tests.api.conftest import assert_error

WRITES = [
    ("post", "/v1/devices", {"json": {"id": "d-1", "model": "m", "firmware_version": "1"}}),
    ("post", "/v1/rollouts", {"json": {}}),
    ("post", "/v1/rollouts/1/pause", {}),
    ("post", "/v1/rollouts/1/resume", {}),
    ("post", "/v1/rollouts/1/abort", {}),
    ("post", "/v1/firmware", {"data": {"model": "m", "version": "1"}, "files": {"file": ("f", b"x")}}),
]
READS = [
    "/v1/devices",
    "/v1/devices/d-1",
    "/v1/firmware",
    "/v1/firmware/1",
    "/v1/rollouts",
    "/v1/rollouts/1",
    "/v1/rollouts/1/devices",
    "/v1/rollouts/1/events",
    "/metrics",
]


def test_reads_need_a_token(client: TestClient) -> None:
    for path in READS:
        response = client.get(path)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer", path


def test_writes_need_a_token_and_the_operator_role(client: TestClient, viewer: dict[str, str]) -> None:
    for method, path, kwargs in WRITES:
        assert_error(client.request(method, path, **kwargs), 401, "unauthorized")  # type: ignore[arg-type]
        response = client.request(method, path, headers=viewer, **kwargs)  # type: ignore[arg-type]
        assert_error(response, 403, "forbidden")


def test_viewer_reads(client: TestClient, viewer: dict[str, str]) -> None:
    assert client.get("/v1/devices", headers=viewer).status_code == 200
    assert client.get("/metrics", headers=viewer).status_code == 200


def test_malformed_or_unknown_tokens_are_401(client: TestClient) -> None:
    for authorization in [
        "Bearer fleet_not-a-token",
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "fleet_abc",
        "Bearer  ",
    ]:
        response = client.get("/v1/rollouts", headers={"Authorization": authorization})
        assert_error(response, 401, "unauthorized")


def test_revoked_token_is_401(client: TestClient, operator: dict[str, str], session: Session) -> None:
    assert client.get("/v1/rollouts", headers=operator).status_code == 200
    token = session.scalar(select(ApiToken).where(ApiToken.name == "ops"))
    assert token is not None
    token.revoked = True
    session.commit()
    assert_error(client.get("/v1/rollouts", headers=operator), 401, "unauthorized")


def test_use_is_recorded(client: TestClient, viewer: dict[str, str], session: Session) -> None:
    client.get("/v1/firmware", headers=viewer)
    token = session.scalar(select(ApiToken).where(ApiToken.name == "dashboard"))
    session.commit()
    assert token is not None and token.last_used_at is not None


def test_open_routes(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/healthz").status_code in (200, 503)  # no broker here: degraded, but answered
    # Firmware content takes a download token instead of an API token.
    assert_error(client.get("/v1/firmware/1/content"), 401, "unauthorized")
    assert_error(
        client.get("/v1/firmware/1/content", headers={"Authorization": "Bearer 1.dev.1.x"}), 403, "forbidden"
    )


def test_openapi_declares_bearer_auth(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["token"]["scheme"] == "bearer"
    assert {"token": []} in schema["paths"]["/v1/rollouts"]["post"]["security"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_cli_creates_a_token_that_works(
    client: TestClient, database_url: str, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEET_DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        created = runner.invoke(token_app, ["create", "--role", "operator", "--name", "ci bot"])
        assert created.exit_code == 0, created.output
        secret = created.stdout.strip().splitlines()[-1]
        assert secret.startswith("fleet_")
        # Only the hash is stored.
        stored = session.scalar(select(ApiToken).where(ApiToken.name == "ci bot"))
        session.commit()  # end the read: SQLite transactions here hold the write lock
        assert stored is not None and stored.role == "operator" and stored.token_hash == hash_secret(secret)
        assert secret not in stored.token_hash
        headers = {"Authorization": f"Bearer {secret}"}
        response = client.post(
            "/v1/devices", headers=headers, json={"id": "d-1", "model": "m", "firmware_version": "1"}
        )
        assert response.status_code == 201
        listed = runner.invoke(token_app, ["list"])
        assert listed.exit_code == 0 and "ci bot" in listed.stdout
        assert runner.invoke(token_app, ["revoke", str(stored.id)]).exit_code == 0
        assert_error(client.get("/v1/devices", headers=headers), 401, "unauthorized")
        bad = runner.invoke(token_app, ["create", "--role", "admin", "--name", "x"])
        assert bad.exit_code != 0
    finally:
        get_settings.cache_clear()
