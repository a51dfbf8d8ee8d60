"""Webhook payloads and their signature.

Each delivery is a JSON POST of one state change, signed like the common providers do: the header
``Fleet-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` under the endpoint's
secret. A receiver recomputes it, compares in constant time, and refuses a ``t`` far from its own
clock (replays). ``Fleet-Event-Id`` and ``Fleet-Delivery-Id`` name what is delivered; a receiver
that dedupes on the event id sees each state change once even if a response was lost.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from orchestrator.models import Event

EVENT_KINDS = ("rollout", "device_update")
SIGNATURE_HEADER = "Fleet-Signature"
MAX_SKEW_S = 300


def new_salt() -> str:
    return secrets.token_hex(16)


def endpoint_secret(server_key: str, salt: str) -> str:
    """The endpoint's signing secret: derived, never stored (shown once when the endpoint is made)."""
    digest = hmac.new(server_key.encode(), f"fleet-webhook:{salt}".encode(), hashlib.sha256).hexdigest()
    return f"whsec_{digest}"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Fleet-Signature`` header value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, now: float | None = None) -> bool:
    """What a receiver does: the signature matches and its time is within MAX_SKEW_S."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > MAX_SKEW_S:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


def state_change(event: Event) -> tuple[str, dict[str, Any]] | None:
    """(kind, payload) when ``event`` is a state change of a rollout or a device update, else None."""
    if event.to_state is None or not event.accepted or event.from_state == event.to_state:
        return None
    common = {
        "event_id": event.id,
        "at": event.created_at.isoformat(),
        "from": event.from_state,
        "to": event.to_state,
    }
    if event.device_update_id is not None:
        detail = event.detail or {}
        return "device_update", {
            "type": "device_update.state",
            **common,
            "rollout_id": event.rollout_id,
            "device_id": event.device_id,
            "update_id": event.device_update_id,
            "attempt": event.attempt,
            "error": detail.get("error"),
        }
    if event.name.startswith("rollout_") and event.rollout_id is not None:
        detail = event.detail or {}
        return "rollout", {
            "type": "rollout.state",
            **common,
            "rollout_id": event.rollout_id,
            "reason": detail.get("reason"),
            "actor": detail.get("actor"),
        }
    return None


def body_of(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
