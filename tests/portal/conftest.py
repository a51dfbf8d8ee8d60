"""Fixtures for the web portal tests: headless Debian Chromium via Playwright, and a full stack whose
API tells browsers the embedded broker's WebSocket URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator.db import session_scope
from orchestrator.local_stack import LocalStack, StackSettings
from orchestrator.services.token_service import create_token
from orchestrator.worker.celery_app import use_redis
from tests.conftest import unavailable
from tests.integration.harness import Harness, scrub_retained

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def make_token(database_url: str, role: str, name: str = "portal-test") -> str:
    with session_scope(database_url) as session:
        _, secret = create_token(session, name=name, role=role)
    return secret


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium (the Debian package; Playwright's own browser downloads are not used)."""
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def artifacts() -> Path:
    """Screenshots land here (gitignored) so they survive the test run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def portal_harness(tmp_path: Path, database_url: str, redis_url: str, mqtt_broker: Any) -> Iterator[Harness]:
    """Like the integration ``harness``, plus FLEET_PORTAL_MQTT_WS_URL pointing at the broker's
    WebSocket listener. Needs an embedded broker (an external one has no known WebSocket port)."""
    if mqtt_broker.ws_port is None:
        pytest.skip("the portal test needs the embedded broker's WebSocket listener")
    if not database_url.startswith("sqlite"):
        pytest.skip("the browser test runs once, on [sqlite-embedded]")
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
            "FLEET_PORTAL_SUMMARY_INTERVAL_MS": "250",
            "FLEET_PORTAL_MQTT_WS_URL": mqtt_broker.ws_url,
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
