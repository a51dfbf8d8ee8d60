"""What a worker process measures: how long each step task ran and how it ended, and webhook posts.

Each prefork child keeps its own registry (:mod:`orchestrator.process_metrics`); a child built
after a fork starts from zero, as a restarted process would.
"""

from __future__ import annotations

import os

import redis

from orchestrator.process_metrics import ProcessMetrics


class EngineMetrics(ProcessMetrics):
    def __init__(self, redis_url: str) -> None:
        super().__init__("worker")
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.task_seconds = self.histogram(
            "fleet_task_seconds", "time a Celery step task ran, by task name", ["task"]
        )
        self.tasks = self.counter(
            "fleet_tasks", "Celery step tasks run, by task name and final state", ["task", "state"]
        )
        self.webhook_posts = self.counter(
            "fleet_webhook_posts", "webhook posts, by outcome (delivered, retry, failed)", ["outcome"]
        )
        self.webhook_seconds = self.histogram("fleet_webhook_post_seconds", "time a webhook post took")


_current: EngineMetrics | None = None


def engine_metrics() -> EngineMetrics:
    """This process's metrics, built again after a fork."""
    global _current
    if _current is None or _current.pid != os.getpid():
        from orchestrator.config import get_settings

        _current = EngineMetrics(get_settings().redis_url)
    return _current
