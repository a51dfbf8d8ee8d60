"""A Celery app with the engine's options and one slow task, for a test that takes Redis away
from under a real worker process (``celery -A tests.integration.redis_loss_app worker``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestrator.config import Settings
from orchestrator.engine.celery_config import make_celery

app = make_celery(Settings(redis_url=os.environ.get("FLEET_REDIS_URL", "redis://127.0.0.1:6379/0")))


@app.task(name="probe.sleep")
def sleep(started: str, done: str, seconds: float) -> None:
    Path(started).touch()
    time.sleep(seconds)
    Path(done).touch()
