"""Reference for the benchmarks: the naive pattern, one Celery task per device that blocks.

Each task publishes the device's desired document (download stage), blocks until the device
reports VERIFIED, publishes the install stage, blocks until an end state, clears the document and
returns. A worker process is busy for the whole round trip, so a worker with concurrency 2 updates
two devices at a time. It writes nothing to SQL: it shows the cost of the pattern itself.

Run by ``benchmarks/rollout_throughput.py`` as its own worker::

    NAIVE_REDIS_URL=redis://127.0.0.1:PORT/0 NAIVE_MQTT_URL=mqtt://127.0.0.1:PORT \
        celery -A benchmarks.naive_reference worker -Q naive -c 2

Every finished task increments ``naive:done`` and ``naive:states`` (a hash per end state) in Redis.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from celery import Celery

QUEUE = "naive"
DONE_KEY = "naive:done"
STATES_KEY = "naive:states"
END_STATES = frozenset({"SUCCEEDED", "FAILED", "ROLLED_BACK"})

app = Celery(
    "fleet_naive",
    broker=os.environ.get("NAIVE_REDIS_URL", "redis://127.0.0.1:1/0"),
    backend=None,
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


class _DeviceLink:
    """One MQTT connection per worker process; a task subscribes to its device's report topic."""

    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        parts = urlsplit(url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"naive-{secrets.token_hex(4)}")
        self.client.max_inflight_messages_set(100)
        self.client.on_message = self._on_message
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[str]]] = {}
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=60)
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        import json

        device_id = message.topic.split("/")[3]
        with self._lock:
            slot = self._waiting.get(device_id)
        if slot is None or not message.payload:
            return
        slot[1].append(str(json.loads(message.payload)["state"]))
        slot[0].set()

    def update(self, device_id: str, download: bytes, install: bytes, timeout: float) -> str:
        report_topic = f"fleet/v1/devices/{device_id}/report"
        desired_topic = f"fleet/v1/devices/{device_id}/desired"
        event, states = threading.Event(), []
        with self._lock:
            self._waiting[device_id] = (event, states)
        try:
            # SUBSCRIBE and PUBLISH share one connection: the broker applies them in order.
            self.client.subscribe(report_topic, qos=0)
            self.client.publish(desired_topic, download, qos=1, retain=True).wait_for_publish(timeout)
            state = self._wait(event, states, {"VERIFIED", *END_STATES}, timeout)
            if state == "VERIFIED":
                self.client.publish(desired_topic, install, qos=1, retain=True).wait_for_publish(timeout)
                state = self._wait(event, states, END_STATES, timeout)
            self.client.publish(desired_topic, b"", qos=1, retain=True).wait_for_publish(timeout)
            return state
        finally:
            self.client.unsubscribe(report_topic)
            with self._lock:
                self._waiting.pop(device_id, None)

    @staticmethod
    def _wait(
        event: threading.Event, states: list[str], wanted: set[str] | frozenset[str], timeout: float
    ) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for state in states:
                if state in wanted:
                    states.clear()
                    return state
            states.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return "TIMED_OUT"
            event.wait(left)
            event.clear()


_link: tuple[int, _DeviceLink] | None = None
_redis: tuple[int, Any] | None = None


def _device_link() -> _DeviceLink:
    global _link
    if _link is None or _link[0] != os.getpid():
        _link = (os.getpid(), _DeviceLink(os.environ["NAIVE_MQTT_URL"]))
    return _link[1]


def _redis_client() -> Any:
    global _redis
    if _redis is None or _redis[0] != os.getpid():
        import redis

        _redis = (os.getpid(), redis.Redis.from_url(os.environ["NAIVE_REDIS_URL"]))
    return _redis[1]


@app.task(name="naive.update_device")
def update_device(device_id: str, download: str, install: str, timeout: float = 60.0) -> str:
    """Drive one device from offer to an end state, holding this worker process throughout."""
    state = _device_link().update(device_id, download.encode(), install.encode(), timeout)
    pipe = _redis_client().pipeline(transaction=False)
    pipe.incr(DONE_KEY)
    pipe.hincrby(STATES_KEY, state, 1)
    pipe.execute()
    return state


if __name__ == "__main__":
    print(__doc__)
