"""What ingest accepts from devices: size, shape, bounds and rate, before anything touches SQL.

A message that fails is never an exception: it is counted, logged at a bounded rate, and (for a
bounded number per device and minute) recorded as a ``rejected`` Event naming the device and the
reason, so an operator can find a misbehaving device without the log drowning in it.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from orchestrator.aws_jobs import RequestTopic, parse_request_topic
from orchestrator.models import utcnow
from orchestrator.protocol import (
    DEVICE_ID_PATTERN,
    MAX_DEVICE_PAYLOAD,
    OFFLINE,
    ONLINE,
    DeviceInfo,
    Report,
    device_topic_parts,
    is_reserved_device_id,
)

log = logging.getLogger(__name__)
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
REJECTED_EVENTS_PER_DEVICE_MINUTE = 5


class RateLimiter:
    """A token bucket per device: ``burst`` messages at once, ``rate`` per second sustained."""

    def __init__(self, rate: float, burst: float, max_devices: int = 200_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_devices = max_devices
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, device_id: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[device_id] = (tokens, now)
            return False
        if len(self._buckets) >= self.max_devices and device_id not in self._buckets:
            self._prune(now)
        self._buckets[device_id] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        # Buckets that have refilled completely carry no information: forget them.
        full = self.burst / self.rate if self.rate > 0 else 0.0
        self._buckets = {d: v for d, v in self._buckets.items() if now - v[1] < full}


class LogLimiter:
    """At most ``per_interval`` lines per ``interval`` seconds; then one summary of what was suppressed."""

    def __init__(self, per_interval: int = 10, interval: float = 10.0) -> None:
        self.per_interval = per_interval
        self.interval = interval
        self._window_start = 0.0
        self._lines = 0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.interval:
            if self._suppressed:
                log.warning(
                    "… %d more such lines suppressed in the last %.0fs", self._suppressed, self.interval
                )
            self._window_start, self._lines, self._suppressed = now, 0, 0
        if self._lines < self.per_interval:
            self._lines += 1
            log.warning(message, *args)
        else:
            self._suppressed += 1


@dataclass
class Parsed:
    """A batch sorted into what ingest applies; every message of the batch is acknowledged after."""

    reports: list[tuple[str, Report]] = field(default_factory=list)
    infos: dict[str, DeviceInfo] = field(default_factory=dict)
    presence: dict[str, bool] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    # AWS IoT Jobs requests, in arrival order (the gateway answers them one by one)
    jobs: list[tuple[RequestTopic, bytes]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reports or self.infos or self.presence or self.rejected or self.jobs)


class Guard:
    """Stateful filter in front of the appliers (rate buckets, per-device rejection budget)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.limiter = RateLimiter(rate, burst)
        self.logs = LogLimiter()
        self.stats: Counter[str] = Counter()
        self._rejections: dict[str, tuple[float, int]] = {}
        self._throttled_logged: dict[str, float] = {}

    def parse(self, messages: list[tuple[str, bytes, bool, int]]) -> Parsed:
        """``(topic, payload, retained, size)`` -> what to apply. Never raises. An oversized payload
        may come empty (dropped on receipt): ``size`` tells."""
        out = Parsed()
        for topic, payload, retained, size in messages:
            if topic.startswith("$aws/"):
                self._jobs_request(out, topic, payload, retained, size)
                continue
            parts = device_topic_parts(topic)
            if parts is None or not _DEVICE_ID.match(parts[0]):
                self.stats["unexpected_topic"] += 1
                continue
            device_id, kind = parts
            if is_reserved_device_id(device_id):
                # Names of the orchestrator's own logins are never devices (see protocol.py).
                self.stats["reserved_device_id"] += 1
                self.logs.warning("%s on %s ignored: %r is a reserved name", kind, topic, device_id)
                continue
            if kind == "report" and retained:
                # A report is an event, not a state: a retained one would be replayed to every
                # restarting ingest. Devices must not leave one; it is dropped unread.
                self.stats["retained_report_ignored"] += 1
                self._reject(out, device_id, kind, "retained report")
                continue
            if not self.limiter.allow(device_id):
                self.stats["throttled"] += 1
                self._throttled(device_id)
                continue
            if size > MAX_DEVICE_PAYLOAD:
                self.stats[f"oversized_{kind}"] += 1
                self._reject(out, device_id, kind, f"payload of {size} bytes > {MAX_DEVICE_PAYLOAD}")
                continue
            if not payload:
                continue  # a cleared retained topic
            try:
                if kind == "report":
                    out.reports.append((device_id, Report.model_validate_json(payload)))
                elif kind == "info":
                    out.infos[device_id] = DeviceInfo.model_validate_json(payload)
                elif kind == "online":
                    text = bytes(payload).decode("utf-8", "replace").strip()
                    if text not in (ONLINE, OFFLINE):
                        raise ValueError(f"online payload must be {ONLINE!r} or {OFFLINE!r}")
                    out.presence[device_id] = text == ONLINE
                else:
                    self.stats["unexpected_topic"] += 1
            except (ValidationError, ValueError) as exc:
                self.stats[f"malformed_{kind}"] += 1
                self._reject(out, device_id, kind, _first_line(exc))
        return out

    def _jobs_request(self, out: Parsed, topic: str, payload: bytes, retained: bool, size: int) -> None:
        """Same bounds as a report: a known request topic, no retained message, the device's rate,
        the payload size. The gateway validates the body, so it can answer a bad one."""
        request = parse_request_topic(topic)
        if request is None:
            self.stats["unexpected_topic"] += 1
            return
        thing = request.thing
        if is_reserved_device_id(thing):
            self.stats["reserved_device_id"] += 1
            self.logs.warning("jobs request on %s ignored: %r is a reserved name", topic, thing)
            return
        if retained:
            self.stats["retained_report_ignored"] += 1
            self._reject(out, thing, "jobs", "retained jobs request")
            return
        if not self.limiter.allow(thing):
            self.stats["throttled"] += 1
            self._throttled(thing)
            return
        if size > MAX_DEVICE_PAYLOAD:
            self.stats["oversized_jobs"] += 1
            self._reject(out, thing, "jobs", f"payload of {size} bytes > {MAX_DEVICE_PAYLOAD}")
            return
        out.jobs.append((request, bytes(payload)))

    def _reject(self, out: Parsed, device_id: str, kind: str, reason: str) -> None:
        self.logs.warning("%s from %s rejected: %s", kind, device_id, reason)
        now = time.monotonic()
        start, count = self._rejections.get(device_id, (now, 0))
        if now - start >= 60:
            start, count = now, 0
        self._rejections[device_id] = (start, count + 1)
        if count >= REJECTED_EVENTS_PER_DEVICE_MINUTE:
            self.stats["rejected_not_recorded"] += 1
            return
        if len(self._rejections) > 100_000:
            self._rejections = {d: v for d, v in self._rejections.items() if now - v[0] < 60}
        out.rejected.append(rejected_event(device_id, f"malformed_{kind}", reason))

    def _throttled(self, device_id: str) -> None:
        now = time.monotonic()
        if now - self._throttled_logged.get(device_id, -1e9) >= 60:
            self._throttled_logged[device_id] = now
            log.warning("device %s sends more than %.0f messages/s: throttled", device_id, self.limiter.rate)
            if len(self._throttled_logged) > 100_000:
                self._throttled_logged.clear()


def rejected_event(device_id: str, name: str, reason: str) -> dict[str, Any]:
    return {
        "kind": "rejected",
        "name": name[:32],
        "device_id": device_id,
        "accepted": False,
        "detail": {"reason": reason[:300]},
        "created_at": utcnow(),
    }


def _first_line(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "message"
            return f"{where}: {first.get('msg', 'invalid')} ({len(errors)} error(s))"
    return text.splitlines()[0][:300] if text else exc.__class__.__name__
