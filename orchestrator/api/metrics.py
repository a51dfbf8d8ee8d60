"""``GET /metrics`` in the Prometheus text format (0.0.4), written by hand.

Families: rollouts by status, device updates by state, devices by presence (from SQL), and per
ingest process its counters and latency percentiles (from the Redis hash ``fleet:ingest:stats``,
one JSON document per process). ``fleet_ingest_reports_per_second`` is the rate of ``received``
between two scrapes of the same API process, so it appears from the second scrape on.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from orchestrator.api.deps import AppSettings, DbSession, Viewer
from orchestrator.api.schemas import errors
from orchestrator.config import Settings
from orchestrator.services import query_service
from orchestrator.state_machines import RolloutState, UpdateState

router = APIRouter(tags=["metrics"])
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class _Family:
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


class Exposition:
    """Samples grouped by metric family, rendered with one HELP and TYPE line per family."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def add(self, name: str, kind: str, help: str, value: float, **labels: str) -> None:
        self._families.setdefault(name, _Family(kind, help)).samples.append((labels, value))

    def render(self) -> str:
        lines: list[str] = []
        for name, family in self._families.items():
            lines.append(f"# HELP {name} {family.help}")
            lines.append(f"# TYPE {name} {family.kind}")
            for labels, value in family.samples:
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(
                    f"{name}{{{rendered}}} {_number(value)}" if rendered else f"{name} {_number(value)}"
                )
        return "\n".join(lines) + "\n"


def read_ingest_stats(settings: Settings) -> dict[str, dict[str, Any]] | None:
    """Per ingest process (its MQTT client id) its latest stats document; None if Redis is down."""
    import redis

    from orchestrator.ingest.service import STATS_KEY

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        raw = client.hgetall(STATS_KEY)
    except redis.RedisError:
        return None
    finally:
        client.close()
    stats: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        try:
            doc = json.loads(value)
        except ValueError:
            continue
        if isinstance(doc, dict):
            stats[key.decode(errors="replace")] = doc
    return stats


def add_ingest(
    out: Exposition, stats: dict[str, dict[str, Any]], memory: dict[str, tuple[float, float]]
) -> None:
    """Ingest families from the stats documents; ``memory`` keeps (updated, received) between scrapes."""
    for ingest, doc in sorted(stats.items()):
        for key, value in sorted(doc.items()):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = _UNSAFE.sub("_", key)
            if key == "updated":
                out.add(
                    "fleet_ingest_last_flush_timestamp_seconds",
                    "gauge",
                    "when the ingest process last published its stats",
                    value,
                    ingest=ingest,
                )
            elif key.endswith("_ms"):
                out.add(
                    f"fleet_ingest_{name}", "gauge", f"ingest {key.replace('_', ' ')}", value, ingest=ingest
                )
            else:
                out.add(
                    f"fleet_ingest_{name}_total",
                    "counter",
                    f"ingest {key.replace('_', ' ')}",
                    value,
                    ingest=ingest,
                )
        updated, received = doc.get("updated"), doc.get("received")
        if not isinstance(updated, int | float) or not isinstance(received, int | float):
            continue
        previous = memory.get(ingest)
        memory[ingest] = (float(updated), float(received))
        if previous is not None and updated > previous[0] and received >= previous[1]:
            rate = (received - previous[1]) / (updated - previous[0])
            out.add(
                "fleet_ingest_reports_per_second",
                "gauge",
                "device messages received per second between the last two scrapes",
                round(rate, 3),
                ingest=ingest,
            )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text"},
        **errors(401, 403, json_content=True),
    },
)
def metrics(request: Request, session: DbSession, settings: AppSettings, _: Viewer) -> PlainTextResponse:
    """Prometheus metrics (scrape with a viewer token: ``authorization: {credentials: ...}``)."""
    out = Exposition()
    rollouts = query_service.rollouts_by_status(session)
    for status in RolloutState:
        out.add(
            "fleet_rollouts",
            "gauge",
            "rollouts by status",
            rollouts.get(status.value, 0),
            status=status.value,
        )
    updates = query_service.updates_by_state(session)
    for state in UpdateState:
        out.add(
            "fleet_device_updates",
            "gauge",
            "device updates by state",
            updates.get(state.value, 0),
            state=state.value,
        )
    devices = query_service.devices_by_online(session)
    for online in (True, False):
        out.add(
            "fleet_devices",
            "gauge",
            "registered devices by presence",
            devices.get(online, 0),
            online=str(online).lower(),
        )
    session.rollback()
    stats = read_ingest_stats(settings)
    out.add(
        "fleet_ingest_stats_up",
        "gauge",
        "1 when the ingest stats could be read from Redis",
        0 if stats is None else 1,
    )
    if stats is not None:
        out.add("fleet_ingest_processes", "gauge", "ingest processes that published stats", len(stats))
        add_ingest(out, stats, request.app.state.ingest_rate_memory)
    return PlainTextResponse(out.render(), media_type=CONTENT_TYPE)
