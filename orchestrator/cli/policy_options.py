"""Turning ``fleet rollout create`` options into the API's target and policy documents."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class OptionError(ValueError):
    """An option the CLI can reject before any request; the message says how to write it."""


def duration_s(text: str, option: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h`` or ``1d`` in seconds."""
    text = text.strip()
    unit = text[-1:].lower()
    number = text[:-1] if unit in _DURATION_UNITS else text
    try:
        value = float(number) * _DURATION_UNITS.get(unit, 1)
    except ValueError:
        raise OptionError(f"{option} {text!r}: write a duration like 90s, 15m or 2h") from None
    if value <= 0:
        raise OptionError(f"{option} {text!r} must be longer than zero")
    return value


def aware_time(text: str, option: str) -> str:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise OptionError(f"{option} {text!r} is not an ISO time like 2030-01-01T02:00:00+00:00") from None
    if when.tzinfo is None:
        raise OptionError(f"{option} needs a time zone, e.g. 2030-01-01T02:00:00+00:00 or ...Z")
    return when.isoformat()


def window(text: str) -> dict[str, Any]:
    """``START..END`` (ISO times with zone), or ``CRON;DURATION[;ZONE]`` such as
    ``0 2 * * mon-fri;2h;Europe/Berlin``."""
    if ".." in text and ";" not in text:
        start, _, end = text.partition("..")
        return {"start": aware_time(start.strip(), "--window"), "end": aware_time(end.strip(), "--window")}
    parts = [p.strip() for p in text.split(";")]
    if len(parts) not in (2, 3) or not parts[0]:
        raise OptionError(
            f"--window {text!r}: write 'CRON;DURATION[;ZONE]' (e.g. '0 2 * * mon-fri;2h;Europe/Berlin') "
            "or 'START..END' with ISO times"
        )
    spec: dict[str, Any] = {"cron": parts[0], "duration_s": duration_s(parts[1], "--window duration")}
    if len(parts) == 3 and parts[2]:
        spec["timezone"] = parts[2]
    return spec


def policy_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OptionError(f"--policy-file {path}: {exc}") from None
    if not isinstance(document, dict):
        raise OptionError(f"--policy-file {path}: the file must hold a JSON object (a rollout policy)")
    return document


def rate(
    initial: int | None, factor: float, every_succeeded: int | None, maximum: int | None
) -> dict[str, Any]:
    if initial is None:
        if every_succeeded is not None or maximum is not None:
            raise OptionError(
                "--rate-every-succeeded and --rate-max ramp --rate; add --rate N (offers/minute)"
            )
        return {}
    ramp: dict[str, Any] = {"initial_per_minute": initial, "factor": factor}
    if every_succeeded is not None:
        ramp["every_succeeded"] = every_succeeded
    if maximum is not None:
        ramp["max_per_minute"] = maximum
    return {"rate": ramp}
