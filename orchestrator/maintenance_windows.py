"""Maintenance windows: when a rollout may send the install stage.

A window is either one explicit interval (``start``/``end``) or a recurrence: a five-field cron
expression (minute hour day-of-month month day-of-week) that opens a window of ``duration_s``,
evaluated in a named time zone (``zoneinfo``), so "02:00 Berlin time" stays 02:00 across daylight
saving changes. Windows of one policy are merged where they overlap or touch.

Everything here is a pure function of ``now``: the engine stores no window state, so a restarted
worker or reconciler reaches the same decision.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# How far ahead a window is looked for; a policy whose next window is further away waits for good.
HORIZON = timedelta(days=400)
MAX_DURATION_S = 7 * 24 * 3600
_DAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MONTH_NAMES = {
    name: i + 1
    for i, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}


class CronError(ValueError):
    """A cron expression that cannot be parsed; the message names the field."""


def _field(text: str, name: str, low: int, high: int, names: dict[str, int] | None = None) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            if not step_text.isdigit() or int(step_text) < 1:
                raise CronError(f"{name}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if part == "*":
            first, last = low, high
        else:
            bounds = part.split("-", 1)
            try:
                ends = [int(b) if b.isdigit() else (names or {})[b.lower()] for b in bounds]
            except KeyError:
                raise CronError(f"{name}: {part!r} is not a number or name") from None
            first, last = ends[0], ends[-1]
            if len(bounds) == 1 and step > 1:
                last = high
        if not (low <= first <= high and low <= last <= high) or first > last:
            raise CronError(f"{name}: {part!r} must lie in {low}-{high}")
        values.update(range(first, last + 1, step))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class Cron:
    """A parsed five-field cron expression. Like cron, when both day fields are restricted a day
    matches either of them."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_any: bool
    weekdays_any: bool

    @classmethod
    def parse(cls, expression: str) -> Cron:
        parts = expression.split()
        if len(parts) != 5:
            raise CronError("a cron expression has five fields: minute hour day-of-month month day-of-week")
        weekdays = _field(parts[4], "day-of-week", 0, 7, _DAY_NAMES)
        return cls(
            minutes=_field(parts[0], "minute", 0, 59),
            hours=_field(parts[1], "hour", 0, 23),
            days=_field(parts[2], "day-of-month", 1, 31),
            months=_field(parts[3], "month", 1, 12, _MONTH_NAMES),
            weekdays=frozenset(d % 7 for d in weekdays),
            days_any=parts[2] == "*",
            weekdays_any=parts[4] == "*",
        )

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        in_days = day.day in self.days
        in_weekdays = (day.isoweekday() % 7) in self.weekdays
        if self.days_any or self.weekdays_any:
            return in_days and in_weekdays
        return in_days or in_weekdays

    def starts(self, after: datetime, zone: ZoneInfo, until: datetime) -> Iterator[datetime]:
        """Start times (UTC, ascending) in [after, until)."""
        day = after.astimezone(zone).date()
        last_day = until.astimezone(zone).date()
        while day <= last_day:
            if self.matches_day(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        local = datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone)
                        at = local.astimezone(UTC)
                        if at >= until:
                            return
                        if at >= after:
                            yield at
            day += timedelta(days=1)


def zone_of(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name like 'Europe/Berlin' or 'UTC'"
        ) from None


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """One window of a policy, already validated (see ``orchestrator.policy.MaintenanceWindow``)."""

    cron: Cron | None
    duration: timedelta
    zone: ZoneInfo
    start: datetime | None = None
    end: datetime | None = None

    def intervals(self, now: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Intervals that end after ``now``, by start time."""
        if self.cron is None:
            assert self.start is not None and self.end is not None
            if self.end > now:
                yield self.start, self.end
            return
        for at in self.cron.starts(now - self.duration, self.zone, now + HORIZON):
            if at + self.duration > now:
                yield at, at + self.duration


def merged(specs: Sequence[WindowSpec], now: datetime) -> Iterator[tuple[datetime, datetime]]:
    """The union of every window's intervals from ``now`` on, as disjoint intervals by start time."""
    stream = heapq.merge(*(spec.intervals(now) for spec in specs))
    current: tuple[datetime, datetime] | None = None
    for start, end in stream:
        if current is None:
            current = (start, end)
        elif start <= current[1]:
            current = (current[0], max(current[1], end))
            if current[1] - current[0] > HORIZON:  # an always-open union: stop extending it
                break
        else:
            yield current
            current = (start, end)
    if current is not None:
        yield current


def next_fit(specs: Sequence[WindowSpec], now: datetime, needed: timedelta) -> datetime | None:
    """The earliest time >= ``now`` from which ``needed`` fits inside one (merged) window; ``now``
    itself when it fits now; None when nothing fits within the horizon. No windows: always ``now``."""
    if not specs:
        return now
    for start, end in merged(specs, now):
        begin = max(start, now)
        if end - begin >= needed:
            return begin
        if start > now + HORIZON:
            break
    return None


def current_window(specs: Sequence[WindowSpec], now: datetime) -> tuple[datetime, datetime] | None:
    """The (merged) window open at ``now``, if any."""
    for start, end in merged(specs, now):
        return (start, end) if start <= now < end else None
    return None


def next_opening(specs: Sequence[WindowSpec], now: datetime) -> datetime | None:
    """When the next window after ``now`` opens (not the one open now)."""
    for start, _end in merged(specs, now):
        if start > now:
            return start
    return None
