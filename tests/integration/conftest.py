"""A full stack per test: the session's Redis and broker, a private database, fresh processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.engine.runtime import Runtime
from tests.integration.engine_kit import engine_runtime
from tests.integration.harness import Harness, running_harness


@pytest.fixture
def harness(tmp_path: Path, database_url: str, redis_url: str, mqtt_broker: Any) -> Iterator[Harness]:
    if database_url.startswith("sqlite") == (mqtt_broker.kind == "external"):
        # Each full-stack test is slow: run it on the embedded pair and the production-like pair.
        pytest.skip("full-stack tests run on [sqlite-embedded] and [postgres-external] only")
    with running_harness(tmp_path / "stack", database_url, redis_url, mqtt_broker) as h:
        yield h


@pytest.fixture
def rt(database_url: str, redis_url: str, mqtt_broker: Any) -> Iterator[Runtime]:
    """Engine steps in this process on real services (no worker): for step-level tests."""
    if database_url.startswith("sqlite") == (mqtt_broker.kind == "external"):
        pytest.skip("runs on [sqlite-embedded] and [postgres-external] only")
    with engine_runtime(database_url, redis_url, mqtt_broker) as runtime:
        yield runtime
