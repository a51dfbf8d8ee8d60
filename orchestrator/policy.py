"""Rollout policy and target selection, validated at the API boundary and stored as JSON."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

WaveSpec = Annotated[str | int, Field(examples=["1%", "10%", "100%", 50])]
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")


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


class Target(BaseModel):
    """Which devices a rollout addresses: explicit ids, or a model with optional label filters."""

    model_config = ConfigDict(extra="forbid")

    device_ids: list[str] | None = Field(None, min_length=1, max_length=1_000_000)
    model: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> Target:
        if self.device_ids is None and self.model is None:
            raise ValueError("give device_ids or model")
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
