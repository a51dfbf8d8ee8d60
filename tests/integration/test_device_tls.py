"""Devices identified by X.509 client certificates (mutual TLS) on Mosquitto, end to end.

A private CA issues a server certificate for the broker's TLS listener and one client certificate
per device (common name = device id). The broker maps the certificate to the MQTT user and client
id, so the certificate is the device's identity and the topic ACLs follow it.
"""

from __future__ import annotations

import secrets
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion

from device_sim.fleet import FleetConfig, spawn_fleet
from orchestrator import pki
from orchestrator.config import DEV_PUBLIC_KEY, REPO_ROOT, Settings
from orchestrator.db import session_scope
from orchestrator.embedded import MosquittoBroker, MqttUser, Role, TlsFiles, find_mosquitto
from orchestrator.engine import client as engine_client
from orchestrator.local_stack import LocalStack, StackSettings
from orchestrator.policy import RolloutPolicy
from orchestrator.services.device_service import register_device
from tests.conftest import unavailable
from tests.integration.harness import QUICK_REAL, Harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SERVICE = MqttUser("service", secrets.token_urlsafe(16), Role.SERVICE)


@pytest.fixture
def tls_broker(tmp_path: Path, embedded_run_dir: Path) -> Any:
    if find_mosquitto() is None:
        unavailable("mutual TLS needs Mosquitto >= 2.0")
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    server = pki.issue_server(ca, "localhost", ["127.0.0.1"])
    for i in range(3):
        pki.issue_device(ca, f"tls-{i:05d}")
    tls = TlsFiles(cafile=ca / pki.CA_CERT, certfile=server.cert, keyfile=server.key)
    broker = MosquittoBroker(run_dir=embedded_run_dir, users=[SERVICE], allow_anonymous=False, tls=tls)
    broker.start()
    yield broker, ca
    broker.stop()


def _client(broker: MosquittoBroker, ca: Path, cert: Path, key: Path) -> tuple[mqtt.Client, dict[str, Any]]:
    state: dict[str, Any] = {"messages": []}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ignored-by-the-broker")
    client.tls_set(ca_certs=str(ca / pki.CA_CERT), certfile=str(cert), keyfile=str(key))
    client.on_connect = lambda c, u, f, rc, p: state.setdefault("rc", int(rc.value))
    client.on_message = lambda c, u, m: state["messages"].append((m.topic, m.payload))
    try:
        client.connect(broker.host, broker.tls_port)
    except (ssl.SSLError, OSError) as exc:
        state["error"] = exc
        return client, state
    client.loop_start()
    deadline = time.monotonic() + 5
    while "rc" not in state and time.monotonic() < deadline:
        time.sleep(0.05)
    return client, state


def _stack_on(broker: MosquittoBroker, tmp_path: Path, redis_url: str, database_url: str) -> StackSettings:
    """A full stack whose services log in to the TLS broker's service listener (SQLite only)."""
    if not database_url.startswith("sqlite"):
        pytest.skip("runs once, on SQLite")
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    engine_client.use_settings(Settings(redis_url=redis_url, database_url=database_url))
    return StackSettings(
        data_dir=tmp_path / "stack",
        database_url=database_url,
        redis_url=redis_url,
        mqtt_url=broker.service_url,
        extra_env={
            "FLEET_MQTT_USERNAME": SERVICE.username,
            "FLEET_MQTT_PASSWORD": SERVICE.password,
            "FLEET_RECONCILE_INTERVAL_S": "1",
        },
    )


def test_a_device_with_a_certificate_updates_over_tls(
    tmp_path: Path, tls_broker: Any, redis_url: str, database_url: str
) -> None:
    broker, ca = tls_broker
    settings = _stack_on(broker, tmp_path, redis_url, database_url)
    with LocalStack(settings) as stack:
        stack.start_all()
        h = Harness(stack, broker.host, broker.service_port)
        # Given three devices that connect with their certificates, no password
        config = FleetConfig(
            broker_url=broker.tls_url,
            devices=3,
            id_prefix="tls-",
            profile="instant",
            params=dict(QUICK_REAL),
            public_key=DEV_PUBLIC_KEY,
            tls_ca=ca / pki.CA_CERT,
            tls_cert_dir=ca / "devices",
        )
        h.fleets.append(spawn_fleet(config))
        try:
            assert h.wait(lambda: h.device_count("tls-") == 3, 60), "devices did not register over TLS"
            # When a rollout runs
            rollout_id = h.start_rollout("tls-", RolloutPolicy(waves=["100%"]))
            h.wait_status(rollout_id, "COMPLETED", timeout=120)
            # Then every device updated, reporting under the identity of its certificate
            assert h.counts(rollout_id) == {"SUCCEEDED": 3}
            assert h.versions("tls-") == {"1.1.0": 3}
        finally:
            h.stop()


def test_a_certificate_is_one_device_and_a_foreign_one_is_refused(tmp_path: Path, tls_broker: Any) -> None:
    broker, ca = tls_broker
    devices = ca / "devices"
    # A certificate with a device's name from another CA: the TLS handshake fails
    other = tmp_path / "other-ca"
    pki.init_ca(other, name="not fleet")
    forged = pki.issue_device(other, "tls-00000")
    _, state = _client(broker, ca, forged.cert, forged.key)
    assert "rc" not in state, "a certificate from another CA was accepted"
    # tls-00001's certificate reaches only tls-00001's topics, whatever client id it asks for
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-t-{secrets.token_hex(3)}")
    watcher.username_pw_set(SERVICE.username, SERVICE.password)
    seen: list[str] = []
    watcher.on_message = lambda c, u, m: seen.append(m.topic)
    watcher.connect(broker.host, broker.service_port)
    watcher.loop_start()
    watcher.subscribe("fleet/v1/devices/#", qos=1)
    time.sleep(0.3)
    attacker, state = _client(broker, ca, devices / "tls-00001.crt", devices / "tls-00001.key")
    assert state.get("rc") == 0
    attacker.publish("fleet/v1/devices/tls-00002/report", b"forged", qos=1).wait_for_publish(5)
    attacker.publish("fleet/v1/devices/tls-00001/online", b"online", qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while "fleet/v1/devices/tls-00001/online" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "fleet/v1/devices/tls-00001/online" in seen
    assert "fleet/v1/devices/tls-00002/report" not in seen
    # and on the AWS IoT Jobs topics it may ask only as its own thing, and hears only its own
    watcher.subscribe("$aws/things/+/jobs/#", qos=1)
    attacker.subscribe("$aws/things/tls-00002/jobs/#", qos=1)
    time.sleep(0.3)
    attacker.publish("$aws/things/tls-00002/jobs/get", b"{}", qos=1).wait_for_publish(5)
    attacker.publish("$aws/things/tls-00001/jobs/notify", b"{}", qos=1).wait_for_publish(5)
    attacker.publish("$aws/things/tls-00001/jobs/get", b"{}", qos=1).wait_for_publish(5)
    watcher.publish("$aws/things/tls-00002/jobs/notify", b"{}", qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while "$aws/things/tls-00001/jobs/get" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "$aws/things/tls-00001/jobs/get" in seen
    assert "$aws/things/tls-00002/jobs/get" not in seen and "$aws/things/tls-00001/jobs/notify" not in seen
    assert not [t for t, _ in state["messages"] if "tls-00002" in t]
    attacker.disconnect()
    watcher.disconnect()


def test_the_aws_sdk_script_in_the_docs_updates_a_device_by_its_certificate(
    tmp_path: Path, tls_broker: Any, redis_url: str, database_url: str
) -> None:
    broker, ca = tls_broker
    settings = _stack_on(broker, tmp_path, redis_url, database_url)
    thing = "tls-00002"
    with LocalStack(settings) as stack:
        stack.start_all()
        h = Harness(stack, broker.host, broker.service_port)
        # Given a thing registered with protocol aws-jobs and a rollout that targets it
        with session_scope(database_url) as session:
            register_device(
                session, device_id=thing, model="sensor-v2", firmware_version="1.0.0", protocol="aws-jobs"
            )
        rollout_id = h.start_rollout(thing, RolloutPolicy(waves=["100%"]))
        # When the script from docs/ runs as written, with the thing's certificate
        script = subprocess.run(
            [
                sys.executable,
                str(REPO_ROOT / "docs" / "aws_jobs_device.py"),
                "--endpoint",
                "localhost",
                "--port",
                str(broker.tls_port),
                "--ca",
                str(ca / pki.CA_CERT),
                "--cert",
                str(ca / "devices" / f"{thing}.crt"),
                "--key",
                str(ca / "devices" / f"{thing}.key"),
                "--thing",
                thing,
                "--idle",
                "4",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        # Then it took the job and the update ended SUCCEEDED, with the new version recorded
        assert script.returncode == 0, script.stderr[-2000:]
        assert '"error"' not in script.stdout, script.stdout
        assert '"version": "1.1.0"' in script.stdout, script.stdout
        assert h.wait_status(rollout_id, "COMPLETED", timeout=30) == "COMPLETED"
        assert h.counts(rollout_id) == {"SUCCEEDED": 1} and h.versions(thing) == {"1.1.0": 1}
        h.stop()
