"""Sending engine steps by task name. Used by workers, ingest, the API and the CLI alike.

A send that fails (broker down) raises :class:`DispatchFailed`; callers that have already committed
their SQL change may ignore it, because the reconciler re-sends every step whose row stopped moving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence

from celery import Celery

from orchestrator.config import Settings

log = logging.getLogger(__name__)

OFFER = "fleet.offer"
INSTALL = "fleet.install"
FINALIZE = "fleet.finalize"
KICK = "fleet.kick"
CLOSE_WAVE = "fleet.close_wave"
REPUBLISH = "fleet.republish"
RECONCILE = "fleet.reconcile"
RETENTION = "fleet.retention"
WEBHOOK_DELIVER = "fleet.webhook_deliver"
# Deliveries per task: each may wait for a slow receiver, so a task stays short.
WEBHOOK_BATCH = 25

# Devices per step message: big enough to amortize a message, small enough to bound a step's work.
STEP_BATCH = 500


class DispatchFailed(RuntimeError):
    """The Celery broker did not take a message."""


def chunks(ids: Sequence[int], size: int = STEP_BATCH) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


class Dispatcher:
    """Sends steps through a Celery app (the worker's own, or a task-less sender app)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(self, task: str, *args: object) -> None:
        try:
            self.app.send_task(task, args=args, retry=False)
        except Exception as exc:
            raise DispatchFailed(f"could not send {task}: {exc}") from exc

    def send_updates(self, task: str, update_ids: Sequence[int]) -> None:
        for chunk in chunks(sorted(set(update_ids))):
            self.send(task, chunk)

    def offer(self, rollout_id: int) -> None:
        self.send(OFFER, rollout_id)

    def install(self, update_ids: Sequence[int]) -> None:
        self.send_updates(INSTALL, update_ids)

    def finalize(self, update_ids: Sequence[int]) -> None:
        self.send_updates(FINALIZE, update_ids)

    def republish(self, update_ids: Sequence[int]) -> None:
        self.send_updates(REPUBLISH, update_ids)

    def kick(self, rollout_id: int) -> None:
        self.send(KICK, rollout_id)

    def close_wave(self, wave_id: int) -> None:
        self.send(CLOSE_WAVE, wave_id)

    def deliver_webhooks(self, delivery_ids: Sequence[int]) -> None:
        for chunk in chunks(sorted(set(delivery_ids)), WEBHOOK_BATCH):
            self.send(WEBHOOK_DELIVER, chunk)


_senders: dict[str, Dispatcher] = {}
_lock = threading.Lock()


def sender_for(settings: Settings) -> Dispatcher:
    """A process-wide dispatcher for ``settings``' broker, built on first use (no tasks registered)."""
    from orchestrator.engine.celery_config import broker_url, make_celery

    url = broker_url(settings)
    with _lock:
        dispatcher = _senders.get(url)
        if dispatcher is None:
            dispatcher = _senders[url] = Dispatcher(make_celery(settings))
        return dispatcher
