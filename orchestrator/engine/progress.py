"""Which rollouts' portal summaries are stale: a Redis set that ingest drains every few hundred ms.

Losing a mark only delays a summary (the reconciler marks every active rollout on each pass), so
a Redis outage is logged once and otherwise ignored.
"""

from __future__ import annotations

import logging
import time

import redis

log = logging.getLogger(__name__)

DIRTY_ROLLOUTS = "fleet:portal:dirty"


class DirtyMarks:
    """Marks rollouts whose summary should be published again; never raises."""

    def __init__(self, client: redis.Redis[bytes]) -> None:
        self.redis = client
        self._failing_since: float | None = None

    def mark(self, *rollout_ids: int) -> None:
        if not rollout_ids:
            return
        try:
            self.redis.sadd(DIRTY_ROLLOUTS, *rollout_ids)
        except redis.RedisError as exc:
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning("cannot mark rollouts for a portal refresh (%s); they refresh later", exc)
            return
        if self._failing_since is not None:
            log.info("Redis is back after %.0fs", time.monotonic() - self._failing_since)
            self._failing_since = None

    def pop(self, limit: int = 1000) -> set[int]:
        """Take up to ``limit`` marked rollouts (raises RedisError: the caller decides)."""
        popped = self.redis.spop(DIRTY_ROLLOUTS, limit) or []
        return {int(x) for x in popped}
