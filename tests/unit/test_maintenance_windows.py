"""Maintenance windows and the rate ramp as pure functions of the clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from orchestrator.maintenance_windows import Cron, CronError, current_window, next_fit, next_opening
from orchestrator.policy import MaintenanceWindow, RateRamp, RolloutPolicy

BERLIN_2AM = {"cron": "0 2 * * mon-fri", "duration_s": 3600, "timezone": "Europe/Berlin"}


def _specs(*windows: dict[str, object]) -> list:  # type: ignore[type-arg]
    return RolloutPolicy(windows=list(windows)).window_specs  # type: ignore[arg-type]


def test_a_cron_window_is_read_in_its_time_zone_across_daylight_saving() -> None:
    specs = _specs(BERLIN_2AM)
    # Thursday 2026-12-03, 06:00 UTC: today's 02:00 Berlin (01:00 UTC) is over; next is Friday
    friday = datetime(2026, 12, 4, 1, 0, tzinfo=UTC)
    assert next_opening(specs, datetime(2026, 12, 3, 6, 0, tzinfo=UTC)) == friday
    # In summer 02:00 Berlin is 00:00 UTC
    assert next_opening(specs, datetime(2026, 7, 1, 12, 0, tzinfo=UTC)) == datetime(
        2026, 7, 2, 0, 0, tzinfo=UTC
    )
    # Friday evening: the next window is Monday's
    monday = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)
    assert next_opening(specs, datetime(2026, 12, 4, 18, 0, tzinfo=UTC)) == monday


def test_an_install_starts_only_where_it_fits_before_the_window_closes() -> None:
    specs = _specs(BERLIN_2AM)
    opens = datetime(2026, 12, 4, 1, 0, tzinfo=UTC)
    fifteen = timedelta(minutes=15)
    assert next_fit(specs, opens - timedelta(hours=3), fifteen) == opens
    inside = opens + timedelta(minutes=10)
    assert current_window(specs, inside) == (opens, opens + timedelta(hours=1))
    assert next_fit(specs, inside, fifteen) == inside
    # 50 minutes in, 15 minutes no longer fit: wait for Monday
    late = opens + timedelta(minutes=50)
    assert next_fit(specs, late, fifteen) == datetime(2026, 12, 7, 1, 0, tzinfo=UTC)
    # an install longer than any window never fits
    assert next_fit(specs, late, timedelta(hours=2)) is None


def test_overlapping_windows_merge_and_no_windows_means_any_time() -> None:
    now = datetime(2026, 12, 3, 9, 30, tzinfo=UTC)
    explicit = {
        "start": datetime(2026, 12, 3, 10, 0, tzinfo=UTC),
        "end": datetime(2026, 12, 3, 11, 0, tzinfo=UTC),
    }
    hourly = {"cron": "30 10 * * *", "duration_s": 3600}
    specs = _specs(explicit, hourly)
    # 10:00-11:00 and 10:30-11:30 are one window of 90 minutes
    assert next_fit(specs, now, timedelta(minutes=80)) == datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    assert next_fit([], now, timedelta(hours=5)) == now
    # an explicit window in the past never opens again
    past = {"start": now - timedelta(hours=2), "end": now - timedelta(hours=1)}
    assert next_fit(_specs(past), now, timedelta(minutes=1)) is None


@pytest.mark.parametrize(
    ("expression", "complaint"),
    [
        ("0 2 * *", "five fields"),
        ("61 2 * * *", "minute"),
        ("0 2 * * funday", "day-of-week"),
        ("*/0 * * * *", "step"),
        ("0 5-2 * * *", "hour"),
    ],
)
def test_a_malformed_cron_names_the_field(expression: str, complaint: str) -> None:
    with pytest.raises(CronError, match=complaint):
        Cron.parse(expression)


def test_cron_matches_either_day_field_when_both_are_restricted() -> None:
    cron = Cron.parse("0 0 1 * mon")
    assert cron.matches_day(datetime(2026, 12, 1).date())  # the 1st (a Tuesday)
    assert cron.matches_day(datetime(2026, 12, 7).date())  # a Monday
    assert not cron.matches_day(datetime(2026, 12, 8).date())


@pytest.mark.parametrize(
    ("window", "complaint"),
    [
        ({"cron": "0 2 * * *"}, "duration_s"),
        ({"cron": "0 2 * * *", "duration_s": 600, "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"start": "2026-12-03T10:00:00Z", "end": "2026-12-03T09:00:00Z"}, "end must be after start"),
        ({"start": "2026-12-03T10:00:00Z"}, "give cron"),
        ({"cron": "0 2 * *", "duration_s": 600}, "five fields"),
    ],
)
def test_a_malformed_window_is_refused(window: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        MaintenanceWindow.model_validate(window)


def test_the_rate_ramps_by_successes_or_by_time_up_to_its_maximum() -> None:
    by_success = RateRamp(initial_per_minute=10, factor=2, every_succeeded=5, max_per_minute=50)
    assert [by_success.per_minute(n, 0) for n in (0, 4, 5, 10, 15, 1000)] == [10, 10, 20, 40, 50, 50]
    by_time = RateRamp(initial_per_minute=10, factor=1.5, every_s=60)
    assert [by_time.per_minute(0, s) for s in (0, 59, 60, 120)] == [10, 10, 15, 22]
    with pytest.raises(ValidationError, match="not both"):
        RateRamp(initial_per_minute=1, every_s=60, every_succeeded=3)
    with pytest.raises(ValidationError, match="at least initial"):
        RateRamp(initial_per_minute=10, max_per_minute=5)


def test_windows_too_short_for_any_install_are_refused() -> None:
    with pytest.raises(ValidationError, match="no install would ever fit"):
        RolloutPolicy(windows=[{"cron": "0 2 * * *", "duration_s": 600}])  # type: ignore[list-item]
    RolloutPolicy(windows=[{"cron": "0 2 * * *", "duration_s": 600}], install_timeout_s=300)  # type: ignore[list-item]
