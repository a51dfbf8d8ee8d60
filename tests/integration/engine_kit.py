"""In-process engine steps against real services: a Runtime, helpers to plan rollouts, apply device
reports and watch retained desired documents. Used by the engine-level integration tests."""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import redis
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select

from orchestrator.config import Settings
from orchestrator.db import session_scope
from orchestrator.engine.celery_config import make_celery
from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.ingest.report_applier import ReportApplier
from orchestrator.models import DeviceUpdate, Firmware, Rollout
from orchestrator.policy import RolloutPolicy, Target
from orchestrator.protocol import ErrorCode, Health, Report, ReportState
from orchestrator.services.rollout_planner import create_rollout
from orchestrator.services.rollout_service import start_rollout
from orchestrator.state_machines import UPDATE_IN_FLIGHT, UpdateState
from tests.factories import add_devices, add_firmware_row


@contextlib.contextmanager
def engine_runtime(database_url: str, redis_url: str, mqtt_broker: Any) -> Iterator[Runtime]:
    """A Runtime on the test's servers (Redis emptied first), as a worker process builds one."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=database_url, redis_url=redis_url, mqtt_url=mqtt_broker.url, stall_s=1
    )
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    app = make_celery(settings)
    runtime = build_runtime(settings, app)
    try:
        yield runtime
    finally:
        runtime.close()
        app.close()


class Retained:
    """The retained desired documents of some devices, as a device would receive them."""

    def __init__(self, broker: Any, prefix: str) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.count: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{secrets.token_hex(4)}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe("fleet/v1/devices/+/desired", qos=1)
        self.prefix = prefix

    def _on_message(self, _c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        device = m.topic.split("/")[3]
        if not device.startswith(self.prefix):
            return
        with self._lock:
            self.count[device] += 1
            if m.payload:
                self.docs[device] = json.loads(m.payload)
            else:
                self.docs.pop(device, None)

    def wait(self, predicate: Any, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def plan_rollout(rt: Runtime, devices: int, policy: RolloutPolicy) -> tuple[int, str]:
    prefix = f"e{secrets.token_hex(3)}-"
    with session_scope(rt.settings.database_url) as session:
        ids = add_devices(session, devices, prefix=prefix)
        firmware = add_firmware_row(session, version=f"9.{secrets.randbelow(10**6)}")
        rollout = create_rollout(
            session, name="t", firmware_id=firmware.id, target=Target(device_ids=ids), policy=policy
        )
        session.commit()
        start_rollout(session, rollout.id, actor="test", send=False)
        return rollout.id, prefix


def counts(rt: Runtime, rollout_id: int) -> dict[str, int]:
    with session_scope(rt.settings.database_url) as session:
        rows = session.execute(
            select(DeviceUpdate.state, func.count())
            .where(DeviceUpdate.rollout_id == rollout_id)
            .group_by(DeviceUpdate.state)
        ).all()
    return {str(state): n for state, n in rows}


def updates(rt: Runtime, rollout_id: int, *states: UpdateState) -> list[DeviceUpdate]:
    with session_scope(rt.settings.database_url) as session:
        query = select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout_id).order_by(DeviceUpdate.id)
        if states:
            query = query.where(DeviceUpdate.state.in_(states))
        return list(session.scalars(query))


_seq = itertools.count(1)


def report(
    rt: Runtime,
    rows: list[DeviceUpdate],
    *states: ReportState,
    version: str = "1.0.0",
    health: Health | None = None,
    error: ErrorCode | None = None,
) -> Any:
    """Reports as the devices would send them (``seq`` rising), applied by ingest's applier."""
    applier = ReportApplier()
    reports = []
    for du in rows:
        for state in states:
            report = Report(
                update_id=du.id,
                attempt=du.attempt,
                state=state,
                seq=next(_seq),
                running_version=version,
                health=health,
                error=error,
            )
            reports.append((du.device_id, report))
    with session_scope(rt.settings.database_url) as session:
        return applier.apply(session, reports)


def queued_messages(rt: Runtime) -> list[tuple[str, Any]]:
    """(task name, args) of every step message waiting in the Celery queue."""
    client = rt.marks.redis
    found = []
    for raw in client.lrange("fleet", 0, -1):
        message = json.loads(raw)
        args = json.loads(__import__("base64").b64decode(message["body"]))[0]
        found.append((message["headers"]["task"], args))
    return found


def in_flight(rt: Runtime, rollout_id: int) -> int:
    by_state = counts(rt, rollout_id)
    return sum(by_state.get(str(s), 0) for s in UPDATE_IN_FLIGHT)


def target_version(rt: Runtime, rollout_id: int) -> str:
    """The firmware version a rollout installs (what a device reports once it succeeded)."""
    with session_scope(rt.settings.database_url) as session:
        return (
            session.scalar(
                select(Firmware.version)
                .join(Rollout, Rollout.firmware_id == Firmware.id)
                .where(Rollout.id == rollout_id)
            )
            or ""
        )
