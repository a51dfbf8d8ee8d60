"""Counters and histograms kept by the processes Prometheus cannot scrape, delivered through Redis.

The ingest process and the Celery worker children have no HTTP port, and a prefork child is a
process of its own. Each keeps a ``prometheus_client`` registry and writes a JSON snapshot of it
into the Redis hash ``fleet:metrics`` (field: role:host:pid) at most once a second. ``/metrics``
on the API re-emits every snapshot written in the last 15 minutes with a ``process`` label, so
one scrape target sees them all; ``sum(rate(...))`` over the label gives fleet-wide figures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

METRICS_KEY = "fleet:metrics"
STALE_S = 900.0
PUBLISH_EVERY_S = 1.0
# Seconds; device steps take milliseconds when nothing waits, seconds over a slow database.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ProcessMetrics:
    """One process's registry and its snapshot publisher; build a new one after a fork."""

    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.process = f"{role}:{socket.gethostname()}:{os.getpid()}"
        self.pid = os.getpid()
        self._published = 0.0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, help, list(labels), registry=self.registry)

    def histogram(self, name: str, help: str, labels: Iterable[str] = ()) -> Histogram:
        return Histogram(name, help, list(labels), buckets=LATENCY_BUCKETS, registry=self.registry)

    def snapshot(self) -> dict[str, Any]:
        families = []
        for metric in self.registry.collect():
            samples = [[s.name, s.labels, s.value] for s in metric.samples if not s.name.endswith("_created")]
            families.append(
                {"name": metric.name, "type": metric.type, "help": metric.documentation, "samples": samples}
            )
        return {"updated": time.time(), "families": families}

    def publish(self, client: redis.Redis[bytes], *, force: bool = False) -> None:
        """Write the snapshot unless one was written less than a second ago; Redis errors are
        swallowed (the next call tries again, and the counters keep counting meanwhile)."""
        now = time.monotonic()
        if not force and now - self._published < PUBLISH_EVERY_S:
            return
        self._published = now
        try:
            client.hset(METRICS_KEY, self.process, json.dumps(self.snapshot()))
        except redis.RedisError as exc:
            log.debug("metrics snapshot not written: %s", exc)

    def publish_soon(self, client: redis.Redis[bytes]) -> None:
        """Publish from a background timer within a second, never on the caller's thread: a slow
        Redis must not slow the task that just ran. The last counts before an idle spell arrive."""
        with self._lock:
            if self._timer is not None and self._timer.is_alive():
                return
            wait = max(0.0, PUBLISH_EVERY_S - (time.monotonic() - self._published))
            self._timer = threading.Timer(wait, self.publish, args=(client,), kwargs={"force": True})
            self._timer.daemon = True
            self._timer.start()


class SnapshotCollector:
    """A ``prometheus_client`` collector over the snapshots in Redis (used by the API's /metrics)."""

    def __init__(self, client: redis.Redis[bytes], *, now: float | None = None) -> None:
        self.client = client
        self.now = now
        self.up = True

    def _documents(self) -> dict[str, dict[str, Any]]:
        try:
            raw = self.client.hgetall(METRICS_KEY)
        except redis.RedisError:
            self.up = False
            return {}
        now = time.time() if self.now is None else self.now
        docs: dict[str, dict[str, Any]] = {}
        stale: list[bytes] = []
        for key, value in raw.items():
            try:
                doc = json.loads(value)
            except ValueError:
                continue
            if not isinstance(doc, dict) or not isinstance(doc.get("families"), list):
                continue
            if now - float(doc.get("updated", 0)) > STALE_S:
                stale.append(key)
                continue
            docs[key.decode(errors="replace")] = doc
        if stale:  # processes that ended long ago: their series end too
            with contextlib.suppress(redis.RedisError):
                self.client.hdel(METRICS_KEY, *stale)
        return docs

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for process, doc in sorted(self._documents().items()):
            for family in doc["families"]:
                try:
                    name, kind, help = str(family["name"]), str(family["type"]), str(family["help"])
                    metric = merged.get(name)
                    if metric is None:
                        metric = merged[name] = Metric(name, help, kind)
                    for sample_name, labels, value in family["samples"]:
                        metric.add_sample(
                            str(sample_name),
                            {**{str(k): str(v) for k, v in labels.items()}, "process": process},
                            float(value),
                        )
                except (KeyError, TypeError, ValueError, AttributeError):
                    log.warning("malformed metrics snapshot from %s skipped", process)
        yield from merged.values()
