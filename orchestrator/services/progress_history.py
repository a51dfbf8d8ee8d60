"""A rollout's progress over time, rebuilt from its events, for the portal's chart.

Every state change of a device update is an event (a transition, or an accepted device report
with the states it moved between), so the counts at any moment can be replayed:
an update is in flight from its OFFERED transition until it leaves the in-flight states (to an end
state, or to RETRYING before its next offer). Events older than the retention age are gone, so a
rollout that ended long ago has no history left; its summary counts remain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.models import Event, Rollout, utcnow
from orchestrator.services.rollout_service import get_rollout
from orchestrator.state_machines import UPDATE_IN_FLIGHT, UpdateState

MAX_POINTS = 240
_NICE_BUCKETS = (10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
_BUSY = {str(s) for s in (*UPDATE_IN_FLIGHT, UpdateState.SOAKING, UpdateState.ROLLING_BACK)}
_FAILED = {str(s) for s in (UpdateState.FAILED, UpdateState.TIMED_OUT, UpdateState.ROLLED_BACK)}
_WATCHED = [
    str(s)
    for s in (
        UpdateState.OFFERED,
        UpdateState.QUEUED,  # only counted when an operator's retry takes a failure back
        UpdateState.SUCCEEDED,
        UpdateState.RETRYING,
        *_FAILED,
        UpdateState.CANCELED,
        UpdateState.SKIPPED,
    )
]


@dataclass(frozen=True)
class ProgressPoint:
    at: datetime
    succeeded: int
    failed: int
    in_flight: int


@dataclass
class ProgressHistory:
    bucket_s: int
    points: list[ProgressPoint] = field(default_factory=list)


def bucket_for(span_s: float, wanted_s: int) -> int:
    """The smallest round bucket of at least ``wanted_s`` that keeps the chart under MAX_POINTS."""
    floor = max(wanted_s, math.ceil(span_s / MAX_POINTS))
    return next((b for b in _NICE_BUCKETS if b >= floor), math.ceil(floor / 86400) * 86400)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def progress_history(session: Session, rollout_id: int, *, bucket_s: int = 60) -> ProgressHistory:
    """Succeeded and failed so far, and updates in flight: zero at the rollout's start, then at the
    end of each bucket up to its end (or now); NotFound if there is no rollout."""
    rollout: Rollout = get_rollout(session, rollout_id)
    rows = (
        session.execute(
            select(Event.created_at, Event.from_state, Event.to_state)
            .where(
                Event.rollout_id == rollout_id,
                Event.kind.in_(("transition", "report")),
                Event.accepted.is_(True),
                Event.to_state.in_(_WATCHED),
            )
            .order_by(Event.created_at, Event.id)
        )
        .tuples()
        .all()
    )
    start = rollout.started_at or (rows[0][0] if rows else None)
    if start is None:
        return ProgressHistory(bucket_s=bucket_s)
    start = _aware(start)
    end = _aware(rollout.finished_at or utcnow())
    bucket = bucket_for((end - start).total_seconds(), bucket_s)
    points = [ProgressPoint(start, 0, 0, 0)]
    succeeded = failed = in_flight = 0
    edge = start + timedelta(seconds=bucket)
    for created_at, from_state, to_state in rows:
        moment = _aware(created_at)
        while moment >= edge and edge < end:
            points.append(ProgressPoint(edge, succeeded, failed, in_flight))
            edge += timedelta(seconds=bucket)
        if from_state == to_state:  # a repeated report moves nothing
            continue
        if to_state == UpdateState.OFFERED:
            in_flight += 1
            continue
        if from_state in _FAILED:  # retried by an operator: no longer a failure
            failed = max(0, failed - 1)
            continue
        if from_state in _BUSY and to_state not in _BUSY:
            in_flight = max(0, in_flight - 1)
        if to_state == UpdateState.SUCCEEDED:
            succeeded += 1
        elif to_state in _FAILED:
            failed += 1
    while edge < end:
        points.append(ProgressPoint(edge, succeeded, failed, in_flight))
        edge += timedelta(seconds=bucket)
    points.append(ProgressPoint(end, succeeded, failed, in_flight))
    return ProgressHistory(bucket_s=bucket, points=points)
