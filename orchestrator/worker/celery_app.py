"""The Celery application. ``celery -A orchestrator.worker worker`` finds it as ``app``."""

from __future__ import annotations

from celery import Celery

from orchestrator.config import get_settings


def create_app() -> Celery:
    settings = get_settings()
    app = Celery("fleet", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A task is acknowledged after it ran; a worker that dies mid-task gives the message back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Engine tasks are short (waiting is parked, not blocking), so a small prefetch keeps both
        # processes busy without hoarding messages a dying worker would hold.
        worker_prefetch_multiplier=4,
        # A dead worker's unacknowledged tasks come back after the visibility timeout; sweep for
        # them every few seconds instead of kombu's default of roughly every 100 s.
        broker_transport_options={
            "visibility_timeout": settings.celery_visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, settings.celery_visibility_timeout_s // 3)),
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        result_expires=86400,
        worker_send_task_events=settings.celery_events,
        task_send_sent_event=settings.celery_events,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule={
            # A run not started within one interval is superseded by the next: no pile-up.
            "reconcile": {
                "task": "fleet.reconcile",
                "schedule": settings.reconcile_interval_s,
                "options": {"expires": settings.reconcile_interval_s},
            },
        },
        include=["orchestrator.worker.tasks"],
    )
    return app


app = create_app()


def use_redis(redis_url: str) -> None:
    """Point this process's Celery app at ``redis_url`` (for callers whose settings came later,
    such as the embedded stack). Call before the process sends its first task."""
    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    # Pools opened against the previous URL would keep sending there; drop this app's references
    # (not the pools themselves: kombu keeps them in a global registry).
    app._pool = None
    app.amqp._producer_pool = None
