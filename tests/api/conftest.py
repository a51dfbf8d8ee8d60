"""An API app per test over a fresh migrated database and the session's Redis, plus tokens.

Routes that start, resume or abort rollouts send ``fleet.kick``; the engine's sender is pointed
at the test Redis so those messages land in its queue (no worker consumes them here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.config import REPO_ROOT, Settings
from orchestrator.db import engine_for, session_factory
from orchestrator.embedded import free_port
from orchestrator.engine import client as engine_client
from orchestrator.services.token_service import create_token

SAMPLES = REPO_ROOT / "firmware_samples"


@dataclass(frozen=True)
class Sample:
    path: Path
    model: str
    version: str
    signature: str
    size: int
    sha256: str


def sample(model: str = "sensor-v2", version: str = "1.1.0") -> Sample:
    manifest = json.loads((SAMPLES / model / f"{version}.json").read_text())
    return Sample(
        SAMPLES / model / f"{version}.bin",
        model,
        version,
        manifest["signature"],
        manifest["size"],
        manifest["sha256"],
    )


@pytest.fixture
def celery_to_test_redis(redis_url: str) -> Iterator[redis.Redis]:
    """Empty test Redis with this process's Celery app sending to it; yields a client for asserts."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    engine_client.use_settings(Settings(redis_url=redis_url))
    yield client
    client.close()


def sent_tasks(client: redis.Redis) -> list[tuple[str, str]]:
    """(task name, argsrepr) of every message waiting in the test Redis queues."""
    found: list[tuple[str, str]] = []
    for key in client.keys("*"):
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            try:
                headers = json.loads(raw)["headers"]
            except (ValueError, KeyError, TypeError):
                continue
            found.append((headers.get("task", ""), headers.get("argsrepr", "")))
    return found


@pytest.fixture
def api_settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    """Settings of the app under test: real database and Redis, no broker (port closed)."""
    return Settings(
        env="test",
        database_url=database_url,
        redis_url=redis_url,
        mqtt_url=f"mqtt://127.0.0.1:{free_port()}",
        firmware_dir=tmp_path / "firmware",
        data_dir=tmp_path / "var",
        max_firmware_bytes=1024 * 1024,
    )


@pytest.fixture
def app(api_settings: Settings, celery_to_test_redis: redis.Redis) -> Iterator[FastAPI]:
    yield create_app(api_settings)
    engine_for(api_settings.database_url).dispose()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def session(api_settings: Settings) -> Iterator[Any]:
    """A session on the app's database for arranging rows and asserting SQL state."""
    s = session_factory(api_settings.database_url)()
    yield s
    s.close()


def _bearer(database_url: str, role: str, name: str) -> dict[str, str]:
    s = session_factory(database_url)()
    try:
        _, secret = create_token(s, name=name, role=role)
    finally:
        s.close()
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def operator(api_settings: Settings) -> dict[str, str]:
    """Headers with an operator token."""
    return _bearer(api_settings.database_url, "operator", "ops")


@pytest.fixture
def viewer(api_settings: Settings) -> dict[str, str]:
    """Headers with a viewer token."""
    return _bearer(api_settings.database_url, "viewer", "dashboard")


def upload(client: TestClient, headers: dict[str, str], fw: Sample | None = None, **form: str) -> Any:
    """POST the sample image to /v1/firmware; returns the response."""
    fw = fw or sample()
    data = {"model": fw.model, "version": fw.version, "signature": fw.signature, **form}
    with fw.path.open("rb") as stream:
        return client.post("/v1/firmware", headers=headers, data=data, files={"file": ("fw.bin", stream)})


def assert_error(response: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    """The response is ``status`` with the JSON error body (and, if given, naming ``field``)."""
    where = f"{response.request.method} {response.request.url}"
    assert response.status_code == status, f"{where}: {response.status_code} {response.text}"
    body: dict[str, Any] = response.json()
    assert body["code"] == code, f"{where}: {body}"
    assert isinstance(body["message"], str) and body["message"]
    if field is not None:
        assert body.get("field") == field, f"{where}: {body}"
    return body
