"""``GET /metrics`` in the Prometheus text format, rendered by ``prometheus_client``.

One scrape target for the whole system. Families come from three places:

* SQL, read at scrape time: rollouts by status, device updates by state, updates per running or
  paused rollout, devices by presence, webhook deliveries by status;
* the ingest's stats documents in Redis (``fleet:ingest:stats``): its counters and latency
  percentiles; ``fleet_ingest_reports_per_second`` is the rate of ``received`` between two scrapes
  of the same API process, so it appears from the second scrape on;
* the registry snapshots of the ingest and worker processes (:mod:`orchestrator.process_metrics`):
  reports applied and refused, batch and report→portal latency histograms, step task durations and
  outcomes, webhook posts, each with a ``process`` label.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy.orm import Session

from orchestrator.api.deps import AppSettings, DbSession, Viewer
from orchestrator.api.schemas import errors
from orchestrator.process_metrics import SnapshotCollector
from orchestrator.services import query_service
from orchestrator.state_machines import RolloutState, UpdateState

router = APIRouter(tags=["metrics"])
# The classic text format: every Prometheus and Grafana Agent version reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def read_ingest_stats(client: redis.Redis[bytes]) -> dict[str, dict[str, Any]] | None:
    """Per ingest process (its MQTT client id) its latest stats document; None if Redis is down."""
    from orchestrator.ingest.service import STATS_KEY

    try:
        raw = client.hgetall(STATS_KEY)
    except redis.RedisError:
        return None
    stats: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        try:
            doc = json.loads(value)
        except ValueError:
            continue
        if isinstance(doc, dict):
            stats[key.decode(errors="replace")] = doc
    return stats


class SqlCollector:
    """Gauges read from SQL at scrape time."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def collect(self) -> Iterator[Metric]:
        rollouts = query_service.rollouts_by_status(self.session)
        family = GaugeMetricFamily("fleet_rollouts", "rollouts by status", labels=["status"])
        for status in RolloutState:
            family.add_metric([status.value], rollouts.get(status.value, 0))
        yield family
        updates = query_service.updates_by_state(self.session)
        family = GaugeMetricFamily("fleet_device_updates", "device updates by state", labels=["state"])
        for state in UpdateState:
            family.add_metric([state.value], updates.get(state.value, 0))
        yield family
        family = GaugeMetricFamily(
            "fleet_rollout_device_updates",
            "device updates of each running or paused rollout, by state",
            labels=["rollout", "name", "state"],
        )
        for rollout_id, name, update_state, count in query_service.active_updates_by_rollout(self.session):
            family.add_metric([str(rollout_id), name, update_state], count)
        yield family
        devices = query_service.devices_by_online(self.session)
        family = GaugeMetricFamily("fleet_devices", "registered devices by presence", labels=["online"])
        for online in (True, False):
            family.add_metric([str(online).lower()], devices.get(online, 0))
        yield family
        deliveries = query_service.webhook_deliveries_by_status(self.session)
        family = GaugeMetricFamily(
            "fleet_webhook_deliveries", "webhook deliveries by status", labels=["status"]
        )
        for delivery_status in ("PENDING", "DELIVERED", "FAILED"):
            family.add_metric([delivery_status], deliveries.get(delivery_status, 0))
        yield family
        self.session.rollback()


class IngestStatsCollector:
    """The ingest's own stats documents; ``memory`` keeps (updated, received) between scrapes."""

    def __init__(self, client: redis.Redis[bytes], memory: dict[str, tuple[float, float]]) -> None:
        self.client = client
        self.memory = memory

    def collect(self) -> Iterator[Metric]:
        stats = read_ingest_stats(self.client)
        up = GaugeMetricFamily("fleet_ingest_stats_up", "1 when the ingest stats could be read from Redis")
        up.add_metric([], 0 if stats is None else 1)
        yield up
        if stats is None:
            return
        processes = GaugeMetricFamily("fleet_ingest_processes", "ingest processes that published stats")
        processes.add_metric([], len(stats))
        yield processes
        families: dict[str, Metric] = {}

        def family(name: str, kind: str, help: str) -> Metric:
            if name not in families:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                families[name] = cls(name, help, labels=["ingest"])
            return families[name]

        for ingest, doc in sorted(stats.items()):
            for key, value in sorted(doc.items()):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                name = _UNSAFE.sub("_", key)
                if key == "updated":
                    target = family(
                        "fleet_ingest_last_flush_timestamp_seconds",
                        "gauge",
                        "when the ingest process last published its stats",
                    )
                elif key.endswith("_ms"):
                    target = family(f"fleet_ingest_{name}", "gauge", f"ingest {key.replace('_', ' ')}")
                else:
                    target = family(f"fleet_ingest_{name}", "counter", f"ingest {key.replace('_', ' ')}")
                target.add_metric([ingest], value)  # type: ignore[attr-defined]
            rate = self._rate(ingest, doc)
            if rate is not None:
                family(
                    "fleet_ingest_reports_per_second",
                    "gauge",
                    "device messages received per second between the last two scrapes",
                ).add_metric([ingest], rate)  # type: ignore[attr-defined]
        yield from families.values()

    def _rate(self, ingest: str, doc: dict[str, Any]) -> float | None:
        updated, received = doc.get("updated"), doc.get("received")
        if not isinstance(updated, int | float) or not isinstance(received, int | float):
            return None
        previous = self.memory.get(ingest)
        self.memory[ingest] = (float(updated), float(received))
        if previous is None or updated <= previous[0] or received < previous[1]:
            return None
        return round((received - previous[1]) / (updated - previous[0]), 3)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text"},
        **errors(401, 403, json_content=True),
    },
)
def metrics(request: Request, session: DbSession, settings: AppSettings, _: Viewer) -> Response:
    """Prometheus metrics (scrape with a viewer token: ``authorization: {credentials: ...}``)."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SqlCollector(session))
        registry.register(IngestStatsCollector(client, request.app.state.ingest_rate_memory))
        registry.register(SnapshotCollector(client))
        body = generate_latest(registry)
    finally:
        client.close()
    return Response(body, media_type=CONTENT_TYPE)
