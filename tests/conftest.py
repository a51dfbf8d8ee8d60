"""Shared fixtures: private servers on free loopback ports, and migrated databases.

Nothing here uses the machine's own Redis, MQTT broker or PostgreSQL unless asked to through
``FLEET_TEST_MQTT_URL`` (adds the ``[external]`` broker) or ``FLEET_TEST_DATABASE_URL`` (adds
``[postgres]`` databases created on that server and dropped afterwards). A service that cannot
be provided skips its tests, or fails them when ``CI`` is set to true.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from orchestrator.embedded import (
    AmqttBroker,
    BrokerInfo,
    ExternalBroker,
    MqttBroker,
    ProcessStartError,
    RedisServer,
    ServerNotFoundError,
    cleanup_stale,
    start_broker,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With both external services set, a test over a database and a broker runs on the pairs
    (SQLite, embedded) and (PostgreSQL, external) only: the mixed pairs test nothing the pure
    ones do not, and cost CI minutes."""
    if not (os.environ.get("FLEET_TEST_MQTT_URL") and os.environ.get("FLEET_TEST_DATABASE_URL")):
        return
    keep: list[pytest.Item] = []
    mixed: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        broker, database = params.get("mqtt_broker"), params.get("migrated_database_template")
        if broker is not None and database is not None and (broker == "external") != (database == "postgres"):
            mixed.append(item)
        else:
            keep.append(item)
    if mixed:
        config.hook.pytest_deselected(items=mixed)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which servers the fixtures will use, so a run's log says what it tested against."""
    from orchestrator.embedded import find_mosquitto, find_redis_server
    from orchestrator.embedded.redis_server import server_version

    try:
        binary = find_redis_server()
        version = ".".join(map(str, server_version(binary) or ()))
        packaged = "packaged" if "site-packages" in str(binary) else "system"
        redis_line = f"redis: {binary} ({packaged}, {version})"
    except ServerNotFoundError as exc:
        redis_line = f"redis: none found ({exc})"
    mosquitto = find_mosquitto()
    broker_line = (
        f"mqtt broker: mosquitto {mosquitto}" if mosquitto else "mqtt broker: amqtt (embedded fallback)"
    )
    lines = [redis_line, broker_line]
    if os.environ.get("FLEET_TEST_MQTT_URL"):
        lines.append(f"external mqtt broker: {os.environ['FLEET_TEST_MQTT_URL']}")
    if os.environ.get("FLEET_TEST_DATABASE_URL"):
        lines.append("postgresql: FLEET_TEST_DATABASE_URL is set")
    return lines


# Stable across runs so that servers left by a killed earlier run are found and stopped.
RUN_DIR = Path(tempfile.gettempdir()) / f"fleet-test-{os.getuid()}"


def in_ci() -> bool:
    """True when running under CI (``CI=true``), where missing services are failures."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Skip the requesting test, or fail it under CI."""
    if in_ci():
        pytest.fail(f"required service unavailable under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def embedded_run_dir() -> Path:
    """Directory for PID files and private server directories; stale servers are stopped first."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    cleanup_stale(RUN_DIR)
    return RUN_DIR


# ------------------------------------------------------------------ Redis
@pytest.fixture(scope="session")
def redis_server(embedded_run_dir: Path) -> Iterator[RedisServer]:
    """A private Redis server for the whole session."""
    try:
        server = RedisServer(run_dir=embedded_run_dir)
        server.start()
    except (ServerNotFoundError, ProcessStartError) as exc:
        unavailable(f"no Redis server: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's private Redis server (``redis://127.0.0.1:PORT/0``)."""
    return redis_server.url


# ------------------------------------------------------------------ MQTT
def _mqtt_params() -> list[Any]:
    params = [pytest.param("embedded", id="embedded")]
    if os.environ.get("FLEET_TEST_MQTT_URL"):
        params.append(pytest.param("external", id="external"))
    return params


@pytest.fixture(scope="session", params=_mqtt_params())
def mqtt_broker(request: pytest.FixtureRequest, embedded_run_dir: Path) -> Iterator[BrokerInfo]:
    """An MQTT broker without auth: ``[embedded]`` (Mosquitto if installed, else amqtt) and,
    when ``FLEET_TEST_MQTT_URL`` is set, ``[external]``.

    Attributes: ``host``, ``port``, ``url``, ``ws_port`` (None for external), ``ws_url``,
    ``kind`` ("mosquitto", "amqtt" or "external"), ``supports_mqtt5``. The broker is shared by
    the session: use topics unique to each test (retained messages stay on an external broker).
    """
    if request.param == "external":
        url = os.environ["FLEET_TEST_MQTT_URL"]
        try:
            external = ExternalBroker.from_url(url)
        except (ValueError, ConnectionError) as exc:
            unavailable(f"external MQTT broker {url}: {exc}")
        yield external
        return
    try:
        broker = start_broker("auto", run_dir=embedded_run_dir)
    except (ServerNotFoundError, ProcessStartError) as exc:
        unavailable(f"no MQTT broker could be started: {exc}")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def amqtt_broker(embedded_run_dir: Path) -> Iterator[MqttBroker]:
    """An amqtt broker (the embedded fallback) without auth, whatever else is installed."""
    try:
        broker = AmqttBroker(run_dir=embedded_run_dir).start()
    except ProcessStartError as exc:
        unavailable(f"amqtt broker did not start: {exc}")
    yield broker
    broker.stop()


# ------------------------------------------------------------------ databases
def _database_params() -> list[Any]:
    params = [pytest.param("sqlite", id="sqlite")]
    if os.environ.get("FLEET_TEST_DATABASE_URL"):
        params.append(pytest.param("postgres", id="postgres"))
    return params


def _postgres_admin_engine(url: str) -> Any:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    # CREATE / DROP DATABASE cannot run inside a transaction.
    return create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def _drop_postgres_database(admin: Any, name: str) -> None:
    from sqlalchemy import text

    with admin.connect() as conn:
        # FORCE ends connections that tests or cached engines left open.
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session", params=_database_params())
def migrated_database_template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A database migrated to head once per session; :func:`database_url` copies it per test."""
    from orchestrator.db import upgrade_database

    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("db-template") / "template.sqlite3"
        url = f"sqlite:///{path}"
        upgrade_database(url)
        yield url
        return

    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    server_url = os.environ["FLEET_TEST_DATABASE_URL"]
    name = f"fleet_t_{secrets.token_hex(6)}_tpl"
    try:
        admin = _postgres_admin_engine(server_url)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        unavailable(f"PostgreSQL at FLEET_TEST_DATABASE_URL: {exc}")
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_database(url)
        yield url
    finally:
        _drop_postgres_database(admin, name)
        admin.dispose()


@pytest.fixture
def database_url(migrated_database_template: str, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh database migrated to head, private to the test: ``[sqlite]`` always (a file
    in the test's tmp_path), ``[postgres]`` when ``FLEET_TEST_DATABASE_URL`` is set (a new
    ``fleet_t_<random>`` database on that server, dropped after the test)."""
    from sqlalchemy.engine import make_url

    template = make_url(migrated_database_template)
    if template.get_backend_name() == "sqlite":
        path = tmp_path / "fleet.sqlite3"
        assert template.database is not None
        src = sqlite3.connect(template.database)
        dst = sqlite3.connect(path)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        yield f"sqlite:///{path}"
        return

    from sqlalchemy import text

    name = f"fleet_t_{secrets.token_hex(6)}"
    # Connect to the server's own database: nobody may be connected to a template being copied.
    admin = _postgres_admin_engine(os.environ["FLEET_TEST_DATABASE_URL"])
    try:
        with admin.connect() as conn:
            # Copying the migrated template is much faster than migrating every test's database.
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template.database}"'))
        yield template.set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_postgres_database(admin, name)
        admin.dispose()
