"""Fixtures for the device-side tests. The MQTT broker (``mqtt_broker``) comes from tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.device_sim.helpers import FirmwareServer, new_id, start_firmware_server


@pytest.fixture(scope="session")
def firmware_server() -> Iterator[FirmwareServer]:
    """A real HTTP server on a free loopback port serving firmware_samples/ (Range, bearer token)."""
    info, httpd = start_firmware_server()
    yield info
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def device_id() -> str:
    """A device id no other test uses (the broker is shared and keeps retained messages)."""
    return new_id()
