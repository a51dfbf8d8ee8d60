"""Celery configuration of the engine; the app is built by :mod:`orchestrator.worker` (workers, beat)
and, without any task registered, by :mod:`orchestrator.engine.dispatch` in senders."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from orchestrator.config import Settings
from orchestrator.engine.redis_transport import TRANSPORT_PATH


def broker_url(settings: Settings) -> str:
    """Celery's transport: ``FLEET_CELERY_BROKER_URL`` (e.g. RabbitMQ) or else ``FLEET_REDIS_URL``."""
    return settings.celery_broker_url or settings.redis_url


def celery_options(settings: Settings) -> dict[str, Any]:
    """Everything but the task list. Nothing reads task results: steps report through SQL."""
    visibility = settings.celery_visibility_timeout_s
    url = broker_url(settings)
    options: dict[str, Any] = {
        "broker_url": url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # A step is acknowledged after it ran; a worker that dies mid-step gives the message back.
        # Steps are idempotent, and the reconciler re-sends lost ones long before any redelivery.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": visibility,
            "unacked_restore_interval": max(1, min(10, visibility // 3)),
            "unacked_restore_throttle": 1,
        },
        # Ride out broker outages: reconnect forever instead of exiting after 100 attempts.
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "broker_heartbeat": 10,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_send_task_events": settings.celery_events,
        "task_send_sent_event": settings.celery_events,
        "worker_hijack_root_logger": False,
        "task_default_queue": "fleet",
    }
    if urlsplit(url).scheme == "redis":
        # kombu's Redis transport with a worker that survives losing Redis mid-poll (see the module).
        options["broker_transport"] = TRANSPORT_PATH
    return options


def make_celery(settings: Settings, *, include: tuple[str, ...] = ()) -> Celery:
    """A Celery app on the engine's broker. Senders pass no ``include``: they send by task name."""
    app = Celery("fleet", set_as_current=False)
    app.conf.update(celery_options(settings), include=list(include))
    if include:
        app.conf.beat_schedule = {
            # A run not started within one interval is superseded by the next: no pile-up.
            "reconcile": {
                "task": "fleet.reconcile",
                "schedule": settings.reconcile_interval_s,
                "options": {"expires": settings.reconcile_interval_s},
            },
            "retention": {
                "task": "fleet.retention",
                "schedule": settings.retention_interval_s,
                "options": {"expires": settings.retention_interval_s},
            },
        }
    return app
