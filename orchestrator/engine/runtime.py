"""Per-process resources of engine steps: DB sessions, a Redis client for progress marks, the MQTT
publisher and the step dispatcher. Built lazily and again after a fork, so prefork children never
share sockets with their parent."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.config import Settings
from orchestrator.db import session_factory
from orchestrator.engine.dispatch import Dispatcher
from orchestrator.engine.progress import DirtyMarks
from orchestrator.mqtt_link import MqttPublisher


@dataclass
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    marks: DirtyMarks
    dispatch: Dispatcher
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
        self.marks.redis.close()


def build_runtime(settings: Settings, app: Celery) -> Runtime:
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
    )
    return Runtime(
        settings=settings,
        sessions=session_factory(settings.database_url),
        marks=DirtyMarks(client),
        dispatch=Dispatcher(app),
    )
