"""A running fleet for integration tests: real Redis, broker, worker processes, ingest, API, devices."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import redis
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select

from device_sim.fleet import FleetConfig, spawn_fleet
from orchestrator.config import DEV_PUBLIC_KEY, REPO_ROOT, Settings
from orchestrator.db import session_scope
from orchestrator.engine import client as engine_client
from orchestrator.local_stack import LocalStack, StackSettings, wait_until
from orchestrator.models import Device, DeviceUpdate, Event, Rollout
from orchestrator.policy import RolloutPolicy, Target
from orchestrator.services import rollout_service
from orchestrator.services.device_service import register_device
from orchestrator.services.firmware_service import add_firmware
from orchestrator.services.rollout_planner import create_rollout
from orchestrator.state_machines import UPDATE_IN_FLIGHT

SAMPLES = REPO_ROOT / "firmware_samples"
# Real downloads and reboots, but fast.
QUICK_REAL = {
    "bandwidth": "2097152:8388608",
    "install_time": "0.05:0.3",
    "boot_time": "0.05:0.3",
    "fetch": "http",
}


def scrub_retained(host: str, port: int, prefix: str = "fleet/v1/#", wait: float = 0.5) -> int:
    """Remove every retained message under ``prefix`` (tests share one broker)."""
    topics: set[str] = set()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"scrub-{time.monotonic_ns()}")
    client.on_message = lambda c, u, m: topics.add(m.topic) if m.retain and m.payload else None
    client.connect(host, port)
    client.loop_start()
    client.subscribe(prefix, qos=1)
    time.sleep(wait)
    for topic in topics:
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    return len(topics)


@contextlib.contextmanager
def running_harness(
    data_dir: Path,
    database_url: str,
    redis_url: str,
    mqtt_broker: Any,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Harness]:
    """A full stack on the session's Redis and broker, started from empty queues and retained topics
    (tests share those servers), stopped afterwards."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    scrub_retained(mqtt_broker.host, mqtt_broker.port)
    engine_client.use_settings(Settings(redis_url=redis_url, database_url=database_url))
    settings = StackSettings(
        data_dir=data_dir,
        database_url=database_url,
        redis_url=redis_url,
        mqtt_url=mqtt_broker.url,
        mqtt5=bool(mqtt_broker.supports_mqtt5),
        extra_env={
            "FLEET_RECONCILE_INTERVAL_S": "1",
            "FLEET_STALL_S": "3",
            "FLEET_CONTINUOUS_SCAN_S": "1",
            "FLEET_CELERY_VISIBILITY_TIMEOUT_S": "10",
            "FLEET_PORTAL_SUMMARY_INTERVAL_MS": "100",
            **(extra_env or {}),
        },
    )
    stack = LocalStack(settings)
    h = Harness(stack, mqtt_broker.host, mqtt_broker.port, mqtt_broker.kind)
    try:
        stack.start_all()
        yield h
    finally:
        h.stop()
        stack.stop()


class Harness:
    def __init__(self, stack: LocalStack, broker_host: str, broker_port: int, broker_kind: str = "") -> None:
        self.stack = stack
        self.broker_kind = broker_kind
        self.database_url = stack.settings.database_url
        self.broker_url = stack.settings.mqtt_url
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.fleets: list[subprocess.Popen[str]] = []

    # ---------------------------------------------------------------- devices
    def start_fleet(
        self,
        devices: int,
        *,
        prefix: str,
        profile: str = "instant",
        params: dict[str, str] | None = None,
        fail_rates: dict[str, float] | None = None,
        seed: int = 7,
        version: str = "1.0.0",
        protocol: str = "fleet",
    ) -> subprocess.Popen[str]:
        """Spawn ``fleet sim``. Devices of protocol aws-jobs are registered here first (fleet's
        agent registers itself; an AWS Jobs device has no such message)."""
        if protocol == "aws-jobs":
            with session_scope(self.database_url) as s:
                for index in range(devices):
                    register_device(
                        s,
                        device_id=f"{prefix}{index:05d}",
                        model="sensor-v2",
                        firmware_version=version,
                        protocol=protocol,
                    )
        config = FleetConfig(
            broker_url=self.broker_url,
            devices=devices,
            model="sensor-v2",
            version=version,
            profile=profile,
            id_prefix=prefix,
            seed=seed,
            public_key=DEV_PUBLIC_KEY,
            params=dict(params or {}),
            fail_rates=dict(fail_rates or {}),
            state_dir=self.stack.settings.data_dir / f"devices-{prefix}",
            protocol=protocol,
        )
        proc = spawn_fleet(config)
        self.fleets.append(proc)
        assert self.wait(lambda: self.device_count(prefix) >= devices, 60), "devices did not register"
        return proc

    def device_count(self, prefix: str = "") -> int:
        with session_scope(self.database_url) as s:
            return s.scalar(select(func.count()).select_from(Device).where(Device.id.startswith(prefix))) or 0

    def versions(self, prefix: str) -> dict[str, int]:
        with session_scope(self.database_url) as s:
            rows = s.execute(
                select(Device.firmware_version, func.count())
                .where(Device.id.startswith(prefix))
                .group_by(Device.firmware_version)
            ).all()
        return {v: n for v, n in rows}

    # ---------------------------------------------------------------- rollouts
    def add_sample_firmware(self, model: str = "sensor-v2", version: str = "1.1.0") -> int:
        manifest = json.loads((SAMPLES / model / f"{version}.json").read_text())
        settings = Settings(
            database_url=self.database_url, firmware_dir=self.stack.settings.data_dir / "firmware"
        )
        with session_scope(self.database_url) as s, (SAMPLES / model / f"{version}.bin").open("rb") as stream:
            fw = add_firmware(
                s, settings, stream, model=model, version=version, signature=manifest["signature"]
            )
            return fw.id

    def start_rollout(self, prefix: str, policy: RolloutPolicy, *, firmware_id: int | None = None) -> int:
        firmware_id = firmware_id or self.add_sample_firmware()
        with session_scope(self.database_url) as s:
            ids = list(s.scalars(select(Device.id).where(Device.id.startswith(prefix))))
            rollout = create_rollout(
                s,
                name=f"test {prefix}",
                firmware_id=firmware_id,
                target=Target(device_ids=ids),
                policy=policy,
            )
            s.commit()
            rollout_service.start_rollout(s, rollout.id, actor="test")
            return rollout.id

    def status(self, rollout_id: int) -> str:
        with session_scope(self.database_url) as s:
            return str(s.get_one(Rollout, rollout_id).status)

    def wait_status(self, rollout_id: int, *statuses: str, timeout: float = 120) -> str:
        if not self.wait(lambda: self.status(rollout_id) in statuses, timeout):
            workers = [p for n, p in self.stack.processes.items() if n.startswith("worker")]
            tail = workers[-1].log_tail(40) if workers else ""
            status, counts = self.status(rollout_id), self.counts(rollout_id)
            raise AssertionError(f"rollout {rollout_id} is {status}, wanted {statuses}; {counts}\n{tail}")
        return self.status(rollout_id)

    def counts(self, rollout_id: int) -> dict[str, int]:
        with session_scope(self.database_url) as s:
            rows = s.execute(
                select(DeviceUpdate.state, func.count())
                .where(DeviceUpdate.rollout_id == rollout_id)
                .group_by(DeviceUpdate.state)
            ).all()
        return {str(state): n for state, n in rows}

    def in_flight(self, rollout_id: int) -> int:
        counts = self.counts(rollout_id)
        return sum(counts.get(str(s), 0) for s in UPDATE_IN_FLIGHT)

    def settled(self, rollout_id: int) -> bool:
        counts = self.counts(rollout_id)
        return not any(s in counts for s in ("PENDING", "QUEUED", "RETRYING", *map(str, UPDATE_IN_FLIGHT)))

    def events(self, rollout_id: int) -> list[Event]:
        with session_scope(self.database_url) as s:
            return list(s.scalars(select(Event).where(Event.rollout_id == rollout_id).order_by(Event.id)))

    def updates(self, rollout_id: int) -> list[DeviceUpdate]:
        with session_scope(self.database_url) as s:
            return list(s.scalars(select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout_id)))

    # ---------------------------------------------------------------- portal
    def portal_snapshot(self, rollout_id: int, wait: float = 1.0) -> dict[str, dict[str, Any]]:
        """Retained portal documents for a rollout, as a freshly loaded page would see them."""
        docs: dict[str, dict[str, Any]] = {}
        lock = threading.Lock()

        def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
            if m.payload:
                with lock:
                    docs[m.topic] = json.loads(m.payload)

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"portal-{time.monotonic_ns()}")
        client.on_message = on_message
        client.connect(self.broker_host, self.broker_port)
        client.loop_start()
        client.subscribe(f"fleet/v1/portal/rollouts/{rollout_id}/#", qos=1)
        client.subscribe(f"fleet/v1/portal/rollouts/{rollout_id}", qos=1)
        time.sleep(wait)
        client.disconnect()
        client.loop_stop()
        return docs

    # ---------------------------------------------------------------- misc
    @staticmethod
    def wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
        return wait_until(predicate, timeout, interval)

    def stop(self) -> None:
        for proc in self.fleets:
            proc.terminate()
        for proc in self.fleets:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
