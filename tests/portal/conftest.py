"""Fixtures for the web portal tests: headless Debian Chromium via Playwright, and a full stack whose
API tells browsers the embedded broker's WebSocket URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.db import session_scope
from orchestrator.services.token_service import create_token
from tests.conftest import unavailable
from tests.integration.harness import Harness, running_harness

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
    extra_env = {"FLEET_PORTAL_SUMMARY_INTERVAL_MS": "250", "FLEET_PORTAL_MQTT_WS_URL": mqtt_broker.ws_url}
    with running_harness(tmp_path / "stack", database_url, redis_url, mqtt_broker, extra_env) as h:
        yield h
