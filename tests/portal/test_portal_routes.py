"""The portal's HTTP side without a browser: the page, its assets, and /v1/portal/config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.config import Settings
from orchestrator.db import engine_for
from orchestrator.embedded import free_port
from tests.portal.conftest import make_token


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        env="test",
        database_url=database_url,
        mqtt_url=f"mqtt://127.0.0.1:{free_port()}",
        firmware_dir=tmp_path / "firmware",
        data_dir=tmp_path / "var",
        portal_mqtt_ws_url="ws://127.0.0.1:19001/mqtt",
        portal_mqtt_username="portal",
        portal_mqtt_password="portal-secret",
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client
    engine_for(settings.database_url).dispose()


def test_root_serves_the_portal_page(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<script src="/static/vendor/mqtt.min.js"' in response.text
    assert '<script src="/static/app.js"' in response.text


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/static/vendor/mqtt.min.js", "javascript"),
        ("/static/app.js", "javascript"),
        ("/static/styles.css", "text/css"),
    ],
)
def test_assets_are_served_locally(client: TestClient, path: str, media_type: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert media_type in response.headers["content-type"]
    assert len(response.content) > 1000


def test_vendored_mqtt_is_the_browser_build(client: TestClient) -> None:
    body = client.get("/static/vendor/mqtt.min.js").text
    assert "connect" in body and "WebSocket" in body


def test_unknown_asset_is_404(client: TestClient) -> None:
    assert client.get("/static/nope.js").status_code == 404


def test_portal_config_requires_a_token(client: TestClient) -> None:
    response = client.get("/v1/portal/config")
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    bad = client.get("/v1/portal/config", headers={"Authorization": "Bearer fleet_nope"})
    assert bad.status_code == 401


def test_portal_config_returns_the_browser_broker_settings(client: TestClient, settings: Settings) -> None:
    secret = make_token(settings.database_url, "viewer")
    response = client.get("/v1/portal/config", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200
    assert response.json() == {
        "mqtt_ws_url": "ws://127.0.0.1:19001/mqtt",
        "mqtt_username": "portal",
        "mqtt_password": "portal-secret",
        "topic_prefix": "fleet/v1/portal/",
        "role": "viewer",
        "token_name": "portal-test",
    }


def test_page_and_assets_stay_out_of_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/portal/config" in paths
    assert "/" not in paths
    assert not any(p.startswith("/static") for p in paths)
