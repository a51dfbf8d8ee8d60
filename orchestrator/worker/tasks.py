"""Celery task declarations. Arguments are ids only; the logic lives in steps and rollout_engine."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm.exc import StaleDataError

from orchestrator.mqtt_link import PublishFailed
from orchestrator.services import rollout_engine
from orchestrator.worker import steps
from orchestrator.worker.celery_app import app
from orchestrator.worker.runtime import get_runtime

log = logging.getLogger(__name__)

# Transient trouble (a concurrent writer, a busy database, a broker hiccup) means: run the step again.
_RETRY_ON = (StaleDataError, OperationalError, PublishFailed, redis.ConnectionError, redis.TimeoutError)
_STEP_OPTIONS: dict[str, Any] = {
    "bind": True,
    "autoretry_for": _RETRY_ON,
    "retry_backoff": 0.2,
    "retry_backoff_max": 10,
    "retry_jitter": True,
    "max_retries": None,
}


@app.task(name="fleet.offer", ignore_result=True, **_STEP_OPTIONS)
def offer(self: Task[Any, Any], update_id: int) -> None:
    steps.offer(get_runtime(), self, update_id)


@app.task(name="fleet.install", ignore_result=True, **_STEP_OPTIONS)
def install(self: Task[Any, Any], update_id: int) -> None:
    steps.install(get_runtime(), self, update_id)


@app.task(name="fleet.finalize", **_STEP_OPTIONS)
def finalize(self: Task[Any, Any], update_id: int) -> str:
    return steps.finalize(get_runtime(), self, update_id)


@app.task(name="fleet.close_wave", **_STEP_OPTIONS)
def close_wave(self: Task[Any, Any], *args: Any) -> str | None:
    # As a chord body it also receives the header results first; the wave id is the last argument.
    return rollout_engine.close_wave(get_runtime(), int(args[-1]))


@app.task(name="fleet.kick_rollout", ignore_result=True, **_STEP_OPTIONS)
def kick_rollout(self: Task[Any, Any], rollout_id: int) -> None:
    rollout_engine.kick_rollout(get_runtime(), rollout_id)


@app.task(name="fleet.publish_summary", ignore_result=True, **_STEP_OPTIONS)
def publish_summary(self: Task[Any, Any], rollout_id: int) -> None:
    get_runtime().store.mark_dirty(rollout_id)


# Not acks_late: a lost periodic run is simply the next one, and an unacknowledged reconcile would
# make the broker never look idle to the reconciler itself.
@app.task(name="fleet.reconcile", ignore_result=True, bind=True, acks_late=False)
def reconcile(self: Task[Any, Any]) -> dict[str, int]:
    from orchestrator.reconciler import reconcile_once

    return reconcile_once(get_runtime())
