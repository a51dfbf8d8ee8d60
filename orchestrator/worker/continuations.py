"""Parked chain continuations, in-flight slots and wait queues in Redis.

A step that waits for a device stores the rest of its Celery chain under
``fleet:cont:{update}:{attempt}:{stage}`` and returns, holding no worker slot. Whoever sees the awaited
state first (ingest on a report, the reconciler on a timeout) claims the key atomically with
``SET … XX GET`` and sends the rest on; the key then reads "claimed", so a redelivered step cannot
park the same stage twice and exactly one party resumes it.

Stages: ``verified`` (offered, waiting for VERIFIED), ``done`` (install sent, waiting for an end state),
``slot`` (waiting for an in-flight slot or for a paused rollout to resume).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import redis
from celery import Celery
from celery.canvas import Signature, signature

log = logging.getLogger(__name__)

Stage = Literal["verified", "done", "slot"]
ParkResult = Literal["parked", "waiting", "claimed"]
CLAIMED = b"claimed"
TTL_S = 14 * 86400

_ACQUIRE_SLOT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""


def cont_key(update_id: int, attempt: int, stage: Stage) -> str:
    return f"fleet:cont:{update_id}:{attempt}:{stage}"


def inflight_key(rollout_id: int) -> str:
    return f"fleet:inflight:{rollout_id}"


def waitq_key(rollout_id: int) -> str:
    return f"fleet:waitq:{rollout_id}"


def finalized_key(update_id: int) -> str:
    return f"fleet:finalized:{update_id}"


DIRTY_ROLLOUTS = "fleet:portal:dirty"


class ContinuationStore:
    """Redis operations behind parking and resuming chains. Safe to share within a process."""

    def __init__(self, client: redis.Redis[bytes], app: Celery) -> None:
        self.redis = client
        self.app = app
        self._acquire = client.register_script(_ACQUIRE_SLOT)

    # ------------------------------------------------------------ park / claim / resume
    def park(self, update_id: int, attempt: int, stage: Stage, rest: Sequence[dict[str, Any]]) -> ParkResult:
        """Store ``rest`` (a Celery request.chain list, next task last) unless this stage was parked before.

        Returns "parked" (stored now), "waiting" (an earlier run of this step parked it and it still
        waits: the step may safely repeat its side effects) or "claimed" (the chain already moved on:
        the step must stop). A ``slot`` wait may repeat for the same attempt (woken, still no slot), so
        it always overwrites; a duplicate that lets through is stopped by the finalize marker.
        """
        payload = json.dumps(list(rest), separators=(",", ":"))
        key = cont_key(update_id, attempt, stage)
        if stage == "slot":
            self.redis.set(key, payload, ex=TTL_S)
            return "parked"
        if self.redis.set(key, payload, nx=True, ex=TTL_S):
            return "parked"
        return "claimed" if self.redis.get(key) == CLAIMED else "waiting"

    def is_parked(self, update_id: int, attempt: int, stage: Stage) -> bool:
        """A continuation waits under this key (present and not yet claimed)."""
        value = self.redis.get(cont_key(update_id, attempt, stage))
        return value is not None and value != CLAIMED

    def ensure_waiting(self, rollout_id: int, update_id: int, attempt: int) -> bool:
        """Put a parked slot wait back in its rollout's queue if it fell out (e.g. a worker died
        between popping and resuming it); True if it had to be re-queued."""
        item = f"{update_id}:{attempt}"
        if self.redis.lpos(waitq_key(rollout_id), item) is not None:
            return False
        self.redis.rpush(waitq_key(rollout_id), item)
        return True

    def claim(self, update_id: int, attempt: int, stage: Stage) -> list[dict[str, Any]] | None:
        """Atomically take a parked continuation; None if absent or already claimed."""
        old: Any = self.redis.set(
            cont_key(update_id, attempt, stage), CLAIMED, xx=True, get=True, keepttl=True
        )
        if old is None or old == CLAIMED:
            return None
        chain: list[dict[str, Any]] = json.loads(old)
        return chain

    def claim_many(self, keys: Iterable[tuple[int, int, Stage]]) -> list[tuple[int, list[dict[str, Any]]]]:
        """Pipeline version of claim for ingest batches; returns (update_id, chain) for each claimed key."""
        wanted = list(keys)
        if not wanted:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for update_id, attempt, stage in wanted:
            pipe.set(cont_key(update_id, attempt, stage), CLAIMED, xx=True, get=True, keepttl=True)
        claimed: list[tuple[int, list[dict[str, Any]]]] = []
        for (update_id, _attempt, _stage), old in zip(wanted, pipe.execute(), strict=True):
            if old is not None and old != CLAIMED:
                claimed.append((update_id, json.loads(old)))
        return claimed

    def resume(self, chain: list[dict[str, Any]], countdown: float | None = None) -> None:
        """Send the next task of a stored chain, passing the remainder on as Celery itself would."""
        if not chain:
            return
        head: Signature[Any] = signature(chain[-1], app=self.app)
        options: dict[str, Any] = {"chain": chain[:-1] or None}
        if countdown:
            options["countdown"] = countdown
        head.apply_async(**options)

    # ------------------------------------------------------------ slots and wait queue
    def acquire_slot(self, rollout_id: int, update_id: int, max_in_flight: int) -> bool:
        return bool(self._acquire(keys=[inflight_key(rollout_id)], args=[update_id, max_in_flight, TTL_S]))

    def release_slot(self, rollout_id: int, update_id: int) -> None:
        self.redis.srem(inflight_key(rollout_id), update_id)

    def slots_in_use(self, rollout_id: int) -> int:
        return int(self.redis.scard(inflight_key(rollout_id)))

    def sync_slots(self, rollout_id: int, in_flight_ids: Iterable[int]) -> None:
        """Make the slot set equal to SQL's in-flight set (after a Redis restart or a lost release)."""
        key = inflight_key(rollout_id)
        wanted = {str(i).encode() for i in in_flight_ids}
        current: set[bytes] = set(self.redis.smembers(key))
        pipe = self.redis.pipeline()
        if stale := current - wanted:
            pipe.srem(key, *stale)
        if missing := wanted - current:
            pipe.sadd(key, *missing)
        pipe.expire(key, TTL_S)
        pipe.execute()

    def enqueue_waiting(self, rollout_id: int, update_id: int, attempt: int) -> None:
        self.redis.rpush(waitq_key(rollout_id), f"{update_id}:{attempt}")
        self.redis.expire(waitq_key(rollout_id), TTL_S)

    def release_waiting(self, rollout_id: int, limit: int) -> int:
        """Resume up to ``limit`` parked offers of a rollout, oldest first; returns how many resumed."""
        resumed = 0
        key = waitq_key(rollout_id)
        while resumed < limit:
            item = self.redis.lpop(key)
            if item is None:
                break
            update_id, attempt = (int(x) for x in item.decode().split(":"))
            chain = self.claim(update_id, attempt, "slot")
            if chain is not None:
                self.resume(chain)
                resumed += 1
        return resumed

    def waiting_count(self, rollout_id: int) -> int:
        return int(self.redis.llen(waitq_key(rollout_id)))

    def mark_finalized(self, update_id: int, task_id: str) -> bool:
        """First finalize of an update wins; a redelivery of that same task may run again."""
        key = finalized_key(update_id)
        if self.redis.set(key, task_id, nx=True, ex=TTL_S):
            return True
        current = self.redis.get(key)
        return current is not None and current.decode() == task_id

    def mark_dirty(self, *rollout_ids: int) -> None:
        if rollout_ids:
            self.redis.sadd(DIRTY_ROLLOUTS, *rollout_ids)
