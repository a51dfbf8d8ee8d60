"""Profiles and per-attempt plans (no servers)."""

from __future__ import annotations

import pytest

from device_sim.profiles import (
    FLAKY,
    INSTANT,
    PROFILES,
    REALISTIC,
    FailureRates,
    get_profile,
    is_silent,
    parse_assignments,
    plan_job,
)


def test_builtin_profiles() -> None:
    assert set(PROFILES) == {"instant", "realistic", "flaky"}
    assert get_profile("instant") is INSTANT
    assert INSTANT.is_deterministic and INSTANT.fetch == "skip"
    assert not REALISTIC.is_deterministic and REALISTIC.fetch == "http" and REALISTIC.bandwidth is not None
    assert FLAKY.rates.install_error > 0 and FLAKY.rates.silent > 0
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("turbo")


def test_instant_plan_has_no_faults_and_no_rng() -> None:
    plan = plan_job(INSTANT, 1, "d", 1, 1)
    assert plan.rng is None and plan.bandwidth is None
    assert not (plan.corrupt or plan.install_error or plan.boot_failure) and plan.offline_at is None
    assert plan.install_time == plan.boot_time == 0


def test_plan_is_reproducible_and_depends_on_inputs() -> None:
    a = plan_job(FLAKY, 7, "dev-1", 3, 1)
    b = plan_job(FLAKY, 7, "dev-1", 3, 1)
    assert (a.install_time, a.boot_time, a.bandwidth, a.offline_at) == (
        b.install_time, b.boot_time, b.bandwidth, b.offline_at,
    )  # fmt: skip
    others = {plan_job(FLAKY, seed, "dev-1", 3, 1).install_time for seed in range(20)}
    assert len(others) > 10
    assert FLAKY.install_time[0] <= a.install_time <= FLAKY.install_time[1]


def test_failure_rates_follow_probabilities() -> None:
    profile = INSTANT.with_overrides(rates={"install_error": 0.3, "checksum": 1.0})
    assert profile.rates.corrupt == 1.0  # alias
    plans = [plan_job(profile, 0, f"d{i}", 1, 1) for i in range(2000)]
    share = sum(p.install_error for p in plans) / len(plans)
    assert 0.25 < share < 0.35
    assert all(p.corrupt for p in plans)
    assert not any(p.boot_failure for p in plans)


def test_overrides_and_validation() -> None:
    p = REALISTIC.with_overrides(params={"bandwidth": "none", "install_time": "1:3", "boot_time": "2"})
    assert p.bandwidth is None and p.install_time == (1.0, 3.0) and p.boot_time == (2.0, 2.0)
    assert REALISTIC.bandwidth is not None  # the original is unchanged
    assert INSTANT.with_overrides(params={"fetch": "http", "reboot_offline": "true"}).reboot_offline
    with pytest.raises(ValueError, match="unknown failure rate"):
        INSTANT.with_overrides(rates={"gremlins": 0.1})
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        FailureRates(install_error=1.5)
    with pytest.raises(ValueError, match="unknown profile parameter"):
        INSTANT.with_overrides(params={"warp": "9"})
    with pytest.raises(ValueError, match="fetch"):
        INSTANT.with_overrides(params={"fetch": "ftp"})
    with pytest.raises(ValueError, match="invalid"):
        INSTANT.with_overrides(params={"install_time": "3:1"})


def test_silent_devices() -> None:
    assert not any(is_silent(INSTANT, 0, f"d{i}") for i in range(100))
    always = INSTANT.with_overrides(rates={"silent": 1.0})
    assert all(is_silent(always, 0, f"d{i}") for i in range(100))
    some = INSTANT.with_overrides(rates={"silent": 0.5})
    picks = [is_silent(some, 3, f"d{i}") for i in range(400)]
    assert 120 < sum(picks) < 280
    assert picks == [is_silent(some, 3, f"d{i}") for i in range(400)]


def test_parse_assignments() -> None:
    assert parse_assignments(["a=1", " b = x "]) == {"a": "1", "b": "x"}
    with pytest.raises(ValueError):
        parse_assignments(["novalue"])
