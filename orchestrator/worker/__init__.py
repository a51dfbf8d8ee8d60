"""Celery worker and beat: ``celery -A orchestrator.worker worker|beat``, ``fleet worker``, ``fleet beat``.

Importing this package builds the engine's Celery app from the settings; only worker and beat
processes do that. Everything else sends steps by name (:mod:`orchestrator.engine.dispatch`).
"""

from orchestrator.config import get_settings
from orchestrator.engine.celery_config import make_celery

app = make_celery(get_settings(), include=("orchestrator.worker.tasks",))

__all__ = ["app"]
