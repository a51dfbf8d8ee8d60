"""No-op Celery tasks for ``benchmarks/redis_servers.py`` (its worker runs ``-A benchmarks.celery_noop``)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

DONE_KEY = "noop:done"


def make_app(url: str) -> Celery:
    """A Celery app on ``url`` (broker and results) with fleet's transport settings."""
    celery = Celery("fleet_noop", broker=url, backend=url)
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return celery


app = make_app(os.environ.get("NOOP_REDIS_URL", "redis://127.0.0.1:1/0"))
_redis: Any = None


@app.task(name="noop.noop")
def noop() -> None:
    return None


@app.task(name="noop.count", ignore_result=True)
def count() -> None:
    # One counter increment per task lets the sender see completion without a result per task.
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(app.conf.broker_url)
    _redis.incr(DONE_KEY)
