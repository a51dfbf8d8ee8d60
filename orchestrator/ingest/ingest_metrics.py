"""What the ingest process measures for Prometheus: reports applied and refused, how long a batch
took to apply, and how long a device's report took to reach the portal topics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from orchestrator.process_metrics import ProcessMetrics

_GUARD_REFUSALS = {
    "unexpected_topic",
    "reserved_device_id",
    "retained_report_ignored",
    "throttled",
    "rejected_not_recorded",
    "unknown_update",
    "version_mismatch",
    "dropped_after_conflicts",
}


def refusal_reason(key: str) -> str | None:
    """The reason label of a stats key that counts a dropped device message, else None."""
    if key in _GUARD_REFUSALS or key.startswith(("oversized_", "malformed_", "ignored_")):
        return key
    return None


class IngestMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__("ingest")
        self.applied = self.counter("fleet_reports_applied", "device reports applied to SQL")
        self.refused = self.counter(
            "fleet_reports_refused",
            "device messages dropped (malformed, oversized, throttled, stale, out of order), by reason",
            ["reason"],
        )
        self.batch_seconds = self.histogram(
            "fleet_ingest_batch_seconds", "time to apply one batch of reports in one transaction"
        )
        self.report_to_portal = self.histogram(
            "fleet_report_to_portal_seconds",
            "from a device's report (its timestamp) to its portal progress message being published",
        )
        self._seen: Counter[str] = Counter()

    def count(self, stats: Mapping[str, int]) -> None:
        """Bring the counters up to the ingest's running totals (called once a second)."""
        for key, total in stats.items():
            if key == "applied":
                name = "applied"
            elif refusal_reason(key) is None:
                continue
            else:
                name = key
            delta = total - self._seen[key]
            if delta <= 0:
                continue
            self._seen[key] = total
            if name == "applied":
                self.applied.inc(delta)
            else:
                self.refused.labels(name).inc(delta)

    def latencies(self, seconds: Iterable[float]) -> None:
        for value in seconds:
            self.report_to_portal.observe(max(0.0, value))
