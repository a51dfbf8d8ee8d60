"""What the API, the CLI and other non-worker code ask of the engine: move a rollout on now.

A nudge is an optimisation, never a requirement: the state change it follows is already committed,
and the reconciler moves every rollout on from SQL within a few seconds if a nudge is lost.
"""

from __future__ import annotations

import logging
import threading

from orchestrator.config import Settings, get_settings
from orchestrator.engine.dispatch import DispatchFailed, sender_for

log = logging.getLogger(__name__)
_override: Settings | None = None
_lock = threading.Lock()


def use_settings(settings: Settings) -> None:
    """Send nudges to ``settings``' broker from now on (for callers whose stack started later, such
    as ``fleet up`` and the test harness)."""
    global _override
    with _lock:
        _override = settings


def current_settings() -> Settings:
    """The settings nudges go by."""
    return _override or get_settings()


def nudge(rollout_id: int) -> bool:
    """Ask the workers to move ``rollout_id`` on (start a wave, admit devices, finish); False if the
    broker could not take the message (the reconciler will do it)."""
    settings = current_settings()
    try:
        sender_for(settings).kick(rollout_id)
    except DispatchFailed as exc:
        log.warning("%s; the reconciler will move rollout %s on", exc, rollout_id)
        return False
    return True


def send_stage(update_ids: list[int]) -> bool:
    """Have the workers publish each update's current stage document (e.g. ``cancel`` after an
    operator's stop request); False if the broker could not take it (the reconciler re-sends)."""
    settings = current_settings()
    try:
        sender_for(settings).republish(update_ids)
    except DispatchFailed as exc:
        log.warning("%s; the reconciler re-sends the documents of updates %s", exc, update_ids)
        return False
    return True
