"""Rollout policy and target selection, validated at the API boundary and stored as JSON."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from functools import cached_property
from typing import Annotated

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.maintenance_windows import MAX_DURATION_S, Cron, CronError, WindowSpec, zone_of

WaveSpec = Annotated[str | int, Field(examples=["1%", "10%", "100%", 50])]
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")


class MaintenanceWindow(BaseModel):
    """When the install stage may be sent: a cron recurrence with a duration, or one interval."""

    model_config = ConfigDict(extra="forbid")

    cron: str | None = Field(
        None,
        examples=["0 2 * * 1-5"],
        description="minute hour day-of-month month day-of-week; opens a window",
    )
    duration_s: float | None = Field(None, ge=60, le=MAX_DURATION_S, description="length of each cron window")
    timezone: str = Field("UTC", examples=["Europe/Berlin"], description="IANA zone the cron is read in")
    start: AwareDatetime | None = Field(None, description="one explicit window: its start")
    end: AwareDatetime | None = Field(None, description="one explicit window: its end")

    @model_validator(mode="after")
    def _one_kind(self) -> MaintenanceWindow:
        zone_of(self.timezone)
        if self.cron is not None:
            if self.start is not None or self.end is not None:
                raise ValueError("a window has either cron and duration_s, or start and end")
            if self.duration_s is None:
                raise ValueError("a cron window needs duration_s")
            try:
                Cron.parse(self.cron)
            except CronError as exc:
                raise ValueError(f"cron: {exc}") from None
        elif self.start is None or self.end is None:
            raise ValueError("give cron and duration_s, or start and end")
        elif self.end <= self.start:
            raise ValueError("end must be after start")
        return self

    def spec(self) -> WindowSpec:
        zone = zone_of(self.timezone)
        if self.cron is not None:
            assert self.duration_s is not None
            return WindowSpec(Cron.parse(self.cron), timedelta(seconds=self.duration_s), zone)
        assert self.start is not None and self.end is not None
        return WindowSpec(None, self.end - self.start, zone, start=self.start, end=self.end)


class RateRamp(BaseModel):
    """Offers per minute, starting at ``initial_per_minute`` and multiplied by ``factor`` each time
    ``every_succeeded`` more devices succeeded (or every ``every_s`` seconds), up to the maximum."""

    model_config = ConfigDict(extra="forbid")

    initial_per_minute: int = Field(ge=1, le=1_000_000)
    factor: float = Field(2.0, ge=1, le=10)
    every_succeeded: int | None = Field(None, ge=1)
    every_s: float | None = Field(None, ge=1)
    max_per_minute: int = Field(1_000_000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one_trigger(self) -> RateRamp:
        if self.every_succeeded is not None and self.every_s is not None:
            raise ValueError("ramp up on every_succeeded or on every_s, not both")
        if self.max_per_minute < self.initial_per_minute:
            raise ValueError("max_per_minute must be at least initial_per_minute")
        return self

    def per_minute(self, succeeded: int, running_for_s: float) -> int:
        """The rate now, after ``succeeded`` successes and ``running_for_s`` seconds of running."""
        if self.every_succeeded is not None:
            steps = succeeded // self.every_succeeded
        elif self.every_s is not None:
            steps = int(max(0.0, running_for_s) // self.every_s)
        else:
            steps = 0
        rate = float(self.initial_per_minute)
        for _ in range(min(steps, 64)):
            rate *= self.factor
            if rate >= self.max_per_minute:
                break
        return int(min(rate, self.max_per_minute))


class SoakPolicy(BaseModel):
    """After an update succeeded the device reports health for ``duration_s``; it counts as
    SUCCEEDED only if it stayed healthy, else it is told to roll back (ROLLED_BACK, ``health``)."""

    model_config = ConfigDict(extra="forbid")

    duration_s: float = Field(ge=1, le=30 * 24 * 3600, description="how long a device must stay healthy")
    heartbeat_s: float = Field(30, ge=0.5, le=3600, description="seconds between the device's health reports")
    missed_heartbeats: int = Field(
        3, ge=1, le=100, description="a device silent for this many heartbeats at the end counts as unhealthy"
    )

    @property
    def silence_s(self) -> float:
        return self.heartbeat_s * self.missed_heartbeats


class RolloutPolicy(BaseModel):
    """How a rollout proceeds. Percent waves are cumulative shares of the target set."""

    model_config = ConfigDict(extra="forbid")

    waves: list[WaveSpec] = Field(
        default_factory=lambda: list[str | int](["1%", "10%", "100%"]), min_length=1, max_length=50
    )
    success_threshold: float = Field(
        0.95, ge=0, le=1, description="share of a wave's finished devices that must succeed"
    )
    failure_threshold_count: int | None = Field(None, ge=1, description="halt after this many failed devices")
    failure_threshold_percent: float | None = Field(
        None, gt=0, le=100, description="halt when this % of finished devices failed (after 10 have finished)"
    )
    max_in_flight: int = Field(1000, ge=1, le=1_000_000)
    download_timeout_s: float = Field(600, gt=0, description="offer -> VERIFIED")
    install_timeout_s: float = Field(900, gt=0, description="install -> running the new version")
    max_attempts: int = Field(2, ge=1, le=10)
    retry_backoff_s: float = Field(5, ge=0, le=3600, description="first retry delay; doubles per attempt")
    windows: list[MaintenanceWindow] = Field(
        default_factory=list, max_length=20, description="install only inside these; none: any time"
    )
    end_at: AwareDatetime | None = Field(
        None, description="no offer after this; devices not reached end SKIPPED (window_closed or offline)"
    )
    rate: RateRamp | None = Field(None, description="offers per minute, ramping up; besides max_in_flight")
    continuous: bool = Field(
        False, description="stay open: devices that match the target later join the last wave until end_at"
    )
    soak: SoakPolicy | None = Field(
        None, description="health-gated soak after each success; a wave passes on devices that stayed healthy"
    )

    @model_validator(mode="after")
    def _installs_fit_a_window(self) -> RolloutPolicy:
        if self.windows:
            longest = max(spec.duration.total_seconds() for spec in self.window_specs)
            if longest < self.install_timeout_s:
                raise ValueError(
                    f"windows: the longest window ({longest:.0f} s) is shorter than install_timeout_s "
                    f"({self.install_timeout_s:.0f} s), so no install would ever fit; lengthen a window "
                    "or lower install_timeout_s"
                )
        return self

    @field_validator("waves")
    @classmethod
    def _check_waves(cls, waves: list[str | int]) -> list[str | int]:
        for spec in waves:
            if isinstance(spec, int):
                if spec < 1:
                    raise ValueError("an absolute wave size must be >= 1")
                continue
            match = _PERCENT.match(spec)
            if not match or not 0 < float(match.group(1)) <= 100:
                raise ValueError(f"wave {spec!r} must be a percent like '10%' (0-100] or a device count")
        return waves

    def backoff(self, attempt: int) -> float:
        """Delay before attempt ``attempt + 1``."""
        return float(self.retry_backoff_s * (2 ** max(0, attempt - 1)))

    @cached_property
    def window_specs(self) -> list[WindowSpec]:
        return [w.spec() for w in self.windows]

    def ended(self, now: datetime) -> bool:
        return self.end_at is not None and now >= self.end_at


def parse_versions(text: str) -> SpecifierSet:
    """A PEP 440 specifier set such as ``>=1.0,<1.1``; ValueError names what is wrong."""
    try:
        return SpecifierSet(text)
    except InvalidSpecifier:
        raise ValueError(f"versions {text!r} is not a PEP 440 specifier like '>=1.0,<1.1'") from None


def version_qualifies(specifiers: SpecifierSet, running: str) -> bool:
    """Whether a running version satisfies the constraint; a version PEP 440 cannot read never does."""
    try:
        return specifiers.contains(Version(running), prereleases=True)
    except InvalidVersion:
        return False


class DeviceFilter(BaseModel):
    """A selection over the inventory; every given part must match. A saved group stores one."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="labels the device reports")
    tags: list[str] = Field(default_factory=list, max_length=20, description="operator tags, all required")
    versions: str | None = Field(
        None, examples=[">=1.0,<1.1"], description="running versions that qualify (PEP 440)"
    )

    @field_validator("versions")
    @classmethod
    def _check_versions(cls, versions: str | None) -> str | None:
        if versions is not None:
            parse_versions(versions)
        return versions


class Target(DeviceFilter):
    """Which devices a rollout addresses: explicit ids, a saved group, or a model with filters.

    ``versions`` applies to every kind: devices whose running version does not satisfy it are
    SKIPPED (incompatible), not left out, so the rollout lists them.
    """

    device_ids: list[str] | None = Field(None, min_length=1, max_length=1_000_000)
    group: str | None = Field(None, description="name of a saved group; its filter is copied in")

    @model_validator(mode="after")
    def _one_kind(self) -> Target:
        kinds = sum(x is not None for x in (self.device_ids, self.group))
        if kinds > 1:
            raise ValueError("give device_ids or group, not both")
        if kinds == 0 and self.model is None:
            raise ValueError("give device_ids, group or model")
        return self


def split_into_waves(count: int, waves: list[str | int]) -> list[int]:
    """Sizes of consecutive waves over ``count`` devices; empty waves are dropped, the last takes the rest.

    Percent specs are cumulative ("1%, 10%, 100%" = first 1 %, up to 10 %, then all); at least one device
    per percent wave while devices remain.
    """
    sizes: list[int] = []
    assigned = 0
    for index, spec in enumerate(waves):
        if assigned >= count:
            break
        last = index == len(waves) - 1
        if isinstance(spec, int):
            size = spec
        else:
            cumulative = -(-count * float(spec[:-1]) // 100)  # ceil
            size = max(1, int(cumulative) - assigned)
        size = count - assigned if last else min(size, count - assigned)
        if size > 0:
            sizes.append(size)
            assigned += size
    if assigned < count:
        sizes.append(count - assigned)
    return sizes


_policies: dict[tuple[int, datetime], RolloutPolicy] = {}


def policy_of(rollout_id: int, created_at: datetime, policy: dict[str, object]) -> RolloutPolicy:
    """The rollout's policy, parsed once per process (a policy never changes after creation)."""
    key = (rollout_id, created_at)
    parsed = _policies.get(key)
    if parsed is None:
        if len(_policies) > 10_000:
            _policies.clear()
        parsed = _policies[key] = RolloutPolicy.model_validate(policy)
    return parsed
