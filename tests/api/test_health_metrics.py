"""/healthz (database, Redis, MQTT broker) and /metrics (Prometheus text)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from orchestrator.api.app import create_app
from orchestrator.config import Settings
from orchestrator.embedded import free_port
from orchestrator.ingest.service import STATS_KEY
from tests.api.conftest import assert_error, upload
from tests.factories import add_devices


def test_healthy_when_everything_answers(api_settings: Settings, mqtt_broker: Any) -> None:
    settings = api_settings.model_copy(update={"mqtt_url": mqtt_broker.url})
    with TestClient(create_app(settings)) as client:
        response = client.get("/healthz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok", "mqtt": "ok"}}


def test_degraded_names_what_is_down(api_settings: Settings) -> None:
    settings = api_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(settings)) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded" and body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("error") and body["checks"]["mqtt"] == "error: no CONNACK"


def test_degraded_when_the_database_is_down(api_settings: Settings) -> None:
    url = f"postgresql+psycopg://fleet@127.0.0.1:{free_port()}/fleet"
    with TestClient(create_app(api_settings.model_copy(update={"database_url": url}))) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "error: OperationalError" and checks["redis"] == "ok"


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.e+]+)$")


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """{(name, labels): value}; asserts every family has HELP and TYPE before its samples."""
    samples: dict[tuple[str, str], float] = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
            continue
        if line.startswith("#") or not line:
            continue
        match = _SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        assert name in declared, f"{name} has no TYPE line"
        samples[(name, labels or "")] = float(value)
    return samples


def test_metrics(
    client: TestClient,
    operator: dict[str, str],
    viewer: dict[str, str],
    session: Session,
    celery_to_test_redis: redis.Redis,
) -> None:
    add_devices(session, 4)
    firmware_id = upload(client, operator).json()["id"]
    body = {"name": "r", "firmware_id": firmware_id, "target": {"model": "sensor-v2"}}
    assert client.post("/v1/rollouts", headers=operator, json=body).status_code == 201
    now = time.time()
    doc = {"received": 100, "applied": 90, "latency_p50_ms": 1.5, "latency_p99_ms": 9.25, "updated": now}
    celery_to_test_redis.hset(STATS_KEY, 'ingest-"1"', json.dumps(doc))

    response = client.get("/metrics", headers=viewer)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    first = parse_metrics(response.text)
    assert first[("fleet_rollouts", 'status="RUNNING"')] == 1
    assert first[("fleet_rollouts", 'status="HALTED"')] == 0
    assert first[("fleet_device_updates", 'state="PENDING"')] == 4
    assert first[("fleet_devices", 'online="true"')] == 4
    assert first[("fleet_ingest_stats_up", "")] == 1
    assert first[("fleet_ingest_processes", "")] == 1
    label = 'ingest="ingest-\\"1\\""'
    assert first[("fleet_ingest_received_total", label)] == 100
    assert first[("fleet_ingest_applied_total", label)] == 90
    assert first[("fleet_ingest_latency_p50_ms", label)] == 1.5
    assert first[("fleet_ingest_last_flush_timestamp_seconds", label)] == now
    assert ("fleet_ingest_reports_per_second", label) not in first  # needs two scrapes

    doc.update(received=300, updated=now + 2)
    celery_to_test_redis.hset(STATS_KEY, 'ingest-"1"', json.dumps(doc))
    second = parse_metrics(client.get("/metrics", headers=viewer).text)
    assert second[("fleet_ingest_reports_per_second", label)] == 100


def test_metrics_without_redis_still_answer(api_settings: Settings, viewer: dict[str, str]) -> None:
    settings = api_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics", headers=viewer)
        assert_error(client.get("/metrics"), 401, "unauthorized")
    assert response.status_code == 200
    assert parse_metrics(response.text)[("fleet_ingest_stats_up", "")] == 0
