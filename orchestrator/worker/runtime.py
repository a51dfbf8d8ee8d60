"""Per-process resources of workers and the reconciler: DB sessions, Redis, MQTT publisher.

Created lazily and again after a fork, so prefork children never share sockets with the parent.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import redis
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.config import Settings, get_settings
from orchestrator.db import session_factory
from orchestrator.mqtt_link import MqttPublisher
from orchestrator.worker.celery_app import app
from orchestrator.worker.continuations import ContinuationStore


@dataclass
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    redis: redis.Redis[bytes]
    store: ContinuationStore
    pid: int = field(default_factory=os.getpid)
    _publisher: MqttPublisher | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def publisher(self) -> MqttPublisher:
        with self._lock:
            if self._publisher is None:
                self._publisher = MqttPublisher(
                    self.settings.mqtt_url,
                    username=self.settings.mqtt_username,
                    password=self.settings.mqtt_password,
                    client_id=f"fleet-worker-{os.getpid()}-{os.urandom(3).hex()}",
                )
            return self._publisher

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        self.redis.close()


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = get_settings()
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=30)
        _runtime = Runtime(
            settings=settings,
            sessions=session_factory(settings.database_url),
            redis=client,
            store=ContinuationStore(client, app),
        )
    return _runtime


def reset_runtime() -> None:
    global _runtime
    if _runtime is not None:
        _runtime.close()
    _runtime = None
