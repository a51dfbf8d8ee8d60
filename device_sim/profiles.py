"""Behaviour profiles for simulated devices: timings, bandwidth and failure injection.

A profile is immutable and shared by every device of a fleet. Everything random about one update
attempt is drawn once, when the attempt starts, into a :class:`JobPlan`, from a ``random.Random``
seeded with ``(seed, device id, update id, attempt)``. A run is therefore reproducible per device
whatever the scheduling order of the other devices, and a restarted agent draws the same plan.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Literal

FetchMode = Literal["http", "skip"]
Range = tuple[float, float]

RATE_NAMES = (
    "corrupt",
    "install_error",
    "boot_failure",
    "offline",
    "silent",
    "duplicate",
    "reorder",
    "unhealthy",
)
# Accepted spellings on the command line, mapped to the field they set.
RATE_ALIASES = {"checksum": "corrupt", "corrupted_download": "corrupt", "rollback": "boot_failure"}
RANGE_FIELDS = ("bandwidth", "install_time", "boot_time", "offline_time")
SCALAR_FIELDS = ("jitter", "progress_step", "download_retries")


@dataclass(frozen=True, slots=True)
class FailureRates:
    """Probabilities (0..1) of each injected fault.

    ``corrupt``, ``install_error``, ``boot_failure``, ``offline`` and ``unhealthy`` (the application
    reports itself unhealthy after the update booted, as a soak would notice) are drawn per attempt;
    ``silent`` once per device (it never answers a desired document); ``duplicate`` and ``reorder``
    per report (published twice / swapped with the next report).
    """

    corrupt: float = 0.0
    install_error: float = 0.0
    boot_failure: float = 0.0
    offline: float = 0.0
    silent: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    unhealthy: float = 0.0

    def __post_init__(self) -> None:
        for name in RATE_NAMES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"failure rate {name}={value} is not within 0..1")

    @property
    def any_per_job(self) -> bool:
        return any((self.corrupt, self.install_error, self.boot_failure, self.offline, self.unhealthy))


@dataclass(frozen=True, slots=True)
class Profile:
    """How a simulated device behaves. Ranges are ``(low, high)``, drawn uniformly per attempt."""

    name: str
    # "http": GET the image with Range/resume and check its sha256; "skip": no transfer at all
    # (the image is taken as received), for throughput runs where bytes would dominate the cost.
    fetch: FetchMode = "http"
    bandwidth: Range | None = None  # bytes/s per device; None = as fast as the server sends
    jitter: float = 0.0  # +/- fraction applied to the bandwidth for each chunk
    install_time: Range = (0.0, 0.0)
    boot_time: Range = (0.0, 0.0)
    reboot_offline: bool = False  # drop the MQTT connection for the boot time, as a real reboot does
    offline_time: Range = (0.0, 0.0)  # how long an injected network loss lasts
    progress_step: int = 25  # report DOWNLOADING each time the percentage crosses a multiple of this
    download_retries: int = 5  # transient HTTP failures tolerated per attempt before download_error
    rates: FailureRates = field(default_factory=FailureRates)

    def __post_init__(self) -> None:
        if self.fetch not in ("http", "skip"):
            raise ValueError(f"fetch must be 'http' or 'skip', not {self.fetch!r}")
        if not 1 <= self.progress_step <= 100:
            raise ValueError("progress_step must be within 1..100")
        for name in RANGE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            low, high = value
            if low < 0 or high < low:
                raise ValueError(f"{name} range {value} is invalid")
        if self.bandwidth is not None and self.bandwidth[0] <= 0:
            raise ValueError("bandwidth must be positive")

    @property
    def is_deterministic(self) -> bool:
        """True when no attempt needs a random draw (no faults, no jitter, fixed timings)."""
        ranges = [getattr(self, n) for n in RANGE_FIELDS]
        fixed = all(r is None or r[0] == r[1] for r in ranges)
        rates = self.rates
        return (
            fixed and self.jitter == 0 and not rates.any_per_job and not rates.duplicate and not rates.reorder
        )

    def with_overrides(
        self,
        rates: dict[str, float] | None = None,
        params: dict[str, str] | None = None,
    ) -> Profile:
        """A copy with some failure rates and/or parameters replaced.

        ``params`` values are strings as typed on a command line: ``"2"`` or ``"1:3"`` for ranges,
        ``"none"`` for no bandwidth limit, ``"http"``/``"skip"`` for fetch, ``true``/``false``.
        """
        changes: dict[str, object] = {}
        if rates:
            rate_changes = {}
            for key, value in rates.items():
                name = RATE_ALIASES.get(key, key)
                if name not in RATE_NAMES:
                    raise ValueError(f"unknown failure rate {key!r}; known: {', '.join(RATE_NAMES)}")
                rate_changes[name] = float(value)
            changes["rates"] = dataclasses.replace(self.rates, **rate_changes)
        for key, raw in (params or {}).items():
            changes[key] = _parse_param(key, raw)
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _parse_param(key: str, raw: str) -> object:
    text = raw.strip().lower()
    if key in RANGE_FIELDS:
        if key == "bandwidth" and text in ("none", "unlimited", "0"):
            return None
        low, _, high = text.partition(":")
        lo = float(low)
        return (lo, float(high) if high else lo)
    if key == "jitter":
        return float(text)
    if key in ("progress_step", "download_retries"):
        return int(text)
    if key == "fetch":
        return text
    if key == "reboot_offline":
        if text not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{key} wants true or false, not {raw!r}")
        return text in ("1", "true", "yes")
    raise ValueError(f"unknown profile parameter {key!r}")


INSTANT = Profile(name="instant", fetch="skip", progress_step=100)
REALISTIC = Profile(
    name="realistic",
    fetch="http",
    bandwidth=(256 * 1024.0, 2 * 1024 * 1024.0),
    jitter=0.3,
    install_time=(2.0, 6.0),
    boot_time=(3.0, 8.0),
    reboot_offline=True,
    offline_time=(5.0, 20.0),
    progress_step=25,
)
FLAKY = dataclasses.replace(
    REALISTIC,
    name="flaky",
    bandwidth=(512 * 1024.0, 4 * 1024 * 1024.0),
    install_time=(0.5, 2.0),
    boot_time=(0.5, 2.0),
    offline_time=(2.0, 8.0),
    rates=FailureRates(
        corrupt=0.05,
        install_error=0.05,
        boot_failure=0.05,
        offline=0.1,
        silent=0.02,
        duplicate=0.05,
        reorder=0.05,
    ),
)
PROFILES: dict[str, Profile] = {p.name: p for p in (INSTANT, REALISTIC, FLAKY)}


def get_profile(name: str) -> Profile:
    """The named built-in profile (``instant``, ``realistic``, ``flaky``)."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (command-line ``key=value`` options)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


@dataclass(slots=True)
class JobPlan:
    """Everything random about one update attempt, drawn when the attempt starts."""

    corrupt: bool = False
    install_error: bool = False
    boot_failure: bool = False
    unhealthy: bool = False  # the new version runs but its application reports itself unhealthy
    offline_at: float | None = None  # fraction of the download after which the network drops
    offline_for: float = 0.0
    bandwidth: float | None = None
    jitter: float = 0.0
    install_time: float = 0.0
    boot_time: float = 0.0
    reboot_offline: bool = False
    duplicate: float = 0.0
    reorder: float = 0.0
    rng: random.Random | None = None  # kept only when something is drawn per chunk or per report

    def jittered(self, rate: float) -> float:
        if self.rng is None or not self.jitter:
            return rate
        return rate * (1.0 + self.rng.uniform(-self.jitter, self.jitter))

    def chance(self, probability: float) -> bool:
        return self.rng is not None and probability > 0 and self.rng.random() < probability


def _uniform(rng: random.Random, value: Range) -> float:
    return value[0] if value[0] == value[1] else rng.uniform(*value)


def plan_job(profile: Profile, seed: int, device_id: str, update_id: int, attempt: int) -> JobPlan:
    """Draw the faults and timings of one attempt. Reproducible for the same arguments."""
    if profile.is_deterministic:
        return JobPlan(
            bandwidth=profile.bandwidth[0] if profile.bandwidth else None,
            install_time=profile.install_time[0],
            boot_time=profile.boot_time[0],
            reboot_offline=profile.reboot_offline,
        )
    rng = random.Random(f"{seed}/{device_id}/{update_id}/{attempt}")
    r = profile.rates
    # Draw every value in a fixed order, whether used or not, so one rate does not shift the others.
    corrupt = rng.random() < r.corrupt
    install_error = rng.random() < r.install_error
    boot_failure = rng.random() < r.boot_failure
    offline = rng.random() < r.offline
    offline_at = rng.uniform(0.1, 0.9)
    offline_for = _uniform(rng, profile.offline_time)
    bandwidth = _uniform(rng, profile.bandwidth) if profile.bandwidth else None
    install_time = _uniform(rng, profile.install_time)
    boot_time = _uniform(rng, profile.boot_time)
    unhealthy = rng.random() < r.unhealthy  # drawn last: adding it shifted no earlier draw
    keep_rng = bool(profile.jitter or r.duplicate or r.reorder)
    return JobPlan(
        corrupt=corrupt,
        install_error=install_error,
        boot_failure=boot_failure,
        unhealthy=unhealthy,
        offline_at=offline_at if offline else None,
        offline_for=offline_for,
        bandwidth=bandwidth,
        jitter=profile.jitter,
        install_time=install_time,
        boot_time=boot_time,
        reboot_offline=profile.reboot_offline,
        duplicate=r.duplicate,
        reorder=r.reorder,
        rng=rng if keep_rng else None,
    )


def is_silent(profile: Profile, seed: int, device_id: str) -> bool:
    """Whether this device is one of the profile's silent ones (never answers)."""
    if not profile.rates.silent:
        return False
    return random.Random(f"{seed}/{device_id}/silent").random() < profile.rates.silent
