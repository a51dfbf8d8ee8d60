"""Celery task declarations of the engine. Arguments are ids only (lists of ids for batched steps);
the logic lives in :mod:`orchestrator.engine`."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from celery import Task
from celery.signals import task_postrun, task_prerun
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm.exc import StaleDataError

from orchestrator.engine import admission, reconciler, retention, steps, waves, webhook_delivery
from orchestrator.engine.dispatch import (
    CLOSE_WAVE,
    FINALIZE,
    INSTALL,
    KICK,
    OFFER,
    RECONCILE,
    REPUBLISH,
    RETENTION,
    WEBHOOK_DELIVER,
)
from orchestrator.engine.engine_metrics import engine_metrics
from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.mqtt_link import PublishFailed
from orchestrator.worker import app

log = logging.getLogger(__name__)

# Transient trouble (a concurrent writer, a busy or restarting database, a broker hiccup) means: run
# the step again shortly. A step that still fails is re-sent by the reconciler from SQL.
_RETRY_ON = (StaleDataError, OperationalError, PublishFailed, redis.ConnectionError, redis.TimeoutError)
_STEP: dict[str, Any] = {
    "bind": True,
    "autoretry_for": _RETRY_ON,
    "retry_backoff": 0.5,
    "retry_backoff_max": 10,
    "retry_jitter": True,
    "max_retries": 8,
}
_runtime: Runtime | None = None
_started: dict[str, float] = {}


def runtime() -> Runtime:
    """This process's runtime, built again after a fork (prefork children own their sockets)."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        from orchestrator.config import get_settings

        _runtime = build_runtime(get_settings(), app)
    return _runtime


@task_prerun.connect
def _task_started(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        _started[task_id] = time.perf_counter()


@task_postrun.connect
def _task_ended(
    task_id: str | None = None, task: Task[Any, Any] | None = None, state: str | None = None, **_: Any
) -> None:
    began = _started.pop(task_id, None) if task_id is not None else None
    if task is None or task.request.is_eager:
        return
    metrics = engine_metrics()
    if began is not None:
        metrics.task_seconds.labels(task.name).observe(time.perf_counter() - began)
    metrics.tasks.labels(task.name, state or "UNKNOWN").inc()
    metrics.publish_soon(metrics.redis)


@app.task(name=OFFER, **_STEP)
def offer(self: Task[Any, Any], rollout_id: int) -> int:
    return admission.admit(runtime(), rollout_id)


@app.task(name=INSTALL, **_STEP)
def install(self: Task[Any, Any], update_ids: list[int]) -> int:
    return steps.install(runtime(), update_ids)


@app.task(name=REPUBLISH, **_STEP)
def republish(self: Task[Any, Any], update_ids: list[int]) -> int:
    return steps.republish(runtime(), update_ids)


@app.task(name=FINALIZE, **_STEP)
def finalize(self: Task[Any, Any], update_ids: list[int]) -> int:
    return steps.finalize(runtime(), update_ids)


@app.task(name=KICK, **_STEP)
def kick(self: Task[Any, Any], rollout_id: int) -> None:
    waves.kick(runtime(), rollout_id)


@app.task(name=CLOSE_WAVE, **_STEP)
def close_wave(self: Task[Any, Any], wave_id: int) -> str | None:
    return waves.close_wave(runtime(), wave_id)


# Not acks_late: a lost periodic run is simply the next one.
@app.task(name=RECONCILE, bind=True, acks_late=False)
def reconcile(self: Task[Any, Any]) -> dict[str, int]:
    return reconciler.reconcile_once(runtime())


@app.task(name=RETENTION, bind=True, acks_late=False)
def purge(self: Task[Any, Any]) -> dict[str, int]:
    return retention.purge_once(runtime())


# Not retried by Celery: a failed delivery is rescheduled in SQL (with backoff) and re-sent by the reconciler.
@app.task(name=WEBHOOK_DELIVER, bind=True)
def deliver_webhooks(self: Task[Any, Any], delivery_ids: list[int]) -> int:
    return webhook_delivery.deliver(runtime(), delivery_ids)
