"""A full stack per test: the session's Redis and broker, a private database, fresh processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator.local_stack import LocalStack, StackSettings
from orchestrator.worker.celery_app import use_redis
from tests.integration.harness import Harness, scrub_retained


@pytest.fixture
def harness(tmp_path: Path, database_url: str, redis_url: str, mqtt_broker: Any) -> Iterator[Harness]:
    # Tests share Redis and the broker: start from empty queues, continuations and retained topics.
    if database_url.startswith("sqlite") == (mqtt_broker.kind == "external"):
        # Each full-stack test is slow: run it on the embedded pair and the production-like pair.
        pytest.skip("full-stack tests run on [sqlite-embedded] and [postgres-external] only")
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    scrub_retained(mqtt_broker.host, mqtt_broker.port)
    use_redis(redis_url)
    settings = StackSettings(
        data_dir=tmp_path / "stack",
        database_url=database_url,
        redis_url=redis_url,
        mqtt_url=mqtt_broker.url,
        shared_subscriptions=bool(mqtt_broker.supports_mqtt5),
        extra_env={
            "FLEET_RECONCILE_INTERVAL_S": "1",
            "FLEET_CELERY_VISIBILITY_TIMEOUT_S": "10",
            "FLEET_PORTAL_SUMMARY_INTERVAL_MS": "100",
        },
    )
    stack = LocalStack(settings)
    h = Harness(stack, mqtt_broker.host, mqtt_broker.port)
    try:
        stack.start_all()
        yield h
    finally:
        h.stop()
        stack.stop()
