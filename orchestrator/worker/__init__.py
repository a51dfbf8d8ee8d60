"""Celery worker package: ``celery -A orchestrator.worker worker`` and ``fleet worker``."""

from orchestrator.worker.celery_app import app

__all__ = ["app"]
