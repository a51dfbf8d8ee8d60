"""/healthz (database, Redis, MQTT broker) and /metrics (Prometheus text)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from orchestrator.api.app import create_app
from orchestrator.config import Settings
from orchestrator.embedded import free_port
from orchestrator.engine.engine_metrics import EngineMetrics
from orchestrator.ingest.ingest_metrics import IngestMetrics
from orchestrator.ingest.service import STATS_KEY
from orchestrator.process_metrics import METRICS_KEY
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


DASHBOARD = Path(__file__).parents[2] / "docs" / "deploy" / "grafana" / "dashboards" / "fleet.json"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.e+]+)$")


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """{(name, labels sorted by name): value}; asserts every family has a TYPE before its samples."""
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
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in declared or family in declared, f"{name} has no TYPE line"
        pairs = sorted(_LABEL.findall(labels or ""))
        samples[(name, ",".join(f'{k}="{v}"' for k, v in pairs))] = float(value)
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
    rollout = next(labels for name, labels in first if name == "fleet_rollout_device_updates")
    assert first[("fleet_rollout_device_updates", rollout)] == 4 and 'state="PENDING"' in rollout

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


def test_metrics_carry_the_process_registries(
    client: TestClient, viewer: dict[str, str], celery_to_test_redis: redis.Redis
) -> None:
    # Given an ingest that applied 5 reports and refused 2, and a worker that ran two steps
    ingest = IngestMetrics()
    ingest.count({"applied": 5, "malformed_report": 2, "received": 7, "cas_retries": 3})
    ingest.count({"applied": 5, "malformed_report": 2})  # the same totals again add nothing
    ingest.latencies([0.004, 0.2])
    ingest.publish(celery_to_test_redis, force=True)
    worker = EngineMetrics("redis://127.0.0.1:1/0")
    worker.task_seconds.labels("fleet.install").observe(0.03)
    worker.tasks.labels("fleet.install", "SUCCESS").inc(2)
    worker.webhook_posts.labels("delivered").inc()
    worker.publish(celery_to_test_redis, force=True)
    # and a snapshot from a process gone for an hour, and one that is not a snapshot
    gone = {"updated": time.time() - 3600, "families": []}
    celery_to_test_redis.hset(METRICS_KEY, "worker:old:1", json.dumps(gone))
    celery_to_test_redis.hset(METRICS_KEY, "worker:bad:2", b"{not json")

    # When Prometheus scrapes the API
    text = client.get("/metrics", headers=viewer).text
    samples = parse_metrics(text)

    # Then both processes' families are there with their process label
    at_ingest = f'process="{ingest.process}"'
    assert samples[("fleet_reports_applied_total", at_ingest)] == 5
    assert samples[("fleet_reports_refused_total", f'{at_ingest},reason="malformed_report"')] == 2
    refused = [labels for name, labels in samples if name == "fleet_reports_refused_total"]
    assert not any("cas_retries" in labels for labels in refused)
    assert samples[("fleet_report_to_portal_seconds_count", at_ingest)] == 2
    assert samples[("fleet_report_to_portal_seconds_bucket", f'le="0.005",{at_ingest}')] == 1
    at_worker = f'process="{worker.process}"'
    assert samples[("fleet_tasks_total", f'{at_worker},state="SUCCESS",task="fleet.install"')] == 2
    assert samples[("fleet_task_seconds_count", f'{at_worker},task="fleet.install"')] == 1
    assert samples[("fleet_webhook_posts_total", f'outcome="delivered",{at_worker}')] == 1
    # and every series the Grafana dashboard queries is one that /metrics exports
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    queried = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bfleet_[a-z_]+", target["expr"])
    }
    assert queried and queried <= declared, queried - declared
    # and the long-gone process's snapshot is dropped from Redis
    assert celery_to_test_redis.hexists(METRICS_KEY, "worker:old:1") == 0
    assert samples[("fleet_webhook_deliveries", 'status="PENDING"')] == 0
