"""Retention: events and audit entries older than ``FLEET_RETENTION_DAYS`` are deleted, in batches.

A beat task (``fleet.retention``, every ``FLEET_RETENTION_INTERVAL_S``) deletes at most
``MAX_BATCHES`` batches per run, so one run never holds a long transaction or a worker for long;
a backlog shrinks run by run. Nothing that belongs to a rollout still in progress (scheduled,
running or paused) is touched, whatever its age: its trail is what its operators look at.
``FLEET_RETENTION_DAYS=0`` keeps everything.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, or_, select

from orchestrator.engine.runtime import Runtime
from orchestrator.models import AuditEntry, Event, Rollout, utcnow
from orchestrator.state_machines import RolloutState

log = logging.getLogger(__name__)
BATCH = 5000
MAX_BATCHES = 20
_IN_PROGRESS = (RolloutState.SCHEDULED, RolloutState.RUNNING, RolloutState.PAUSED)


def purge_once(rt: Runtime) -> dict[str, int]:
    """Delete what is past retention, up to MAX_BATCHES batches per table; returns rows deleted."""
    days = rt.settings.retention_days
    if days <= 0:
        return {}
    cutoff = utcnow() - timedelta(days=days)
    with rt.sessions() as session:
        active = list(session.scalars(select(Rollout.id).where(Rollout.status.in_(_IN_PROGRESS))))
    active_ids = [str(i) for i in active]
    removed = {
        "events": _purge(
            rt,
            select(Event.id).where(
                Event.created_at < cutoff, or_(Event.rollout_id.is_(None), Event.rollout_id.not_in(active))
            ),
            Event,
        ),
        "audit_entries": _purge(
            rt,
            select(AuditEntry.id).where(
                AuditEntry.created_at < cutoff,
                # spelled without NOT: a NULL target must not make the whole test NULL
                or_(
                    AuditEntry.target_kind.is_(None),
                    AuditEntry.target_kind != "rollout",
                    AuditEntry.target_id.is_(None),
                    AuditEntry.target_id.not_in(active_ids),
                ),
            ),
            AuditEntry,
        ),
    }
    if any(removed.values()):
        log.info("retention: deleted %s (older than %d days)", removed, days)
    return removed


def _purge(rt: Runtime, due: object, model: type[Event] | type[AuditEntry]) -> int:
    total = 0
    for _ in range(MAX_BATCHES):
        with rt.sessions() as session:
            ids = list(session.scalars(due.order_by(model.id).limit(BATCH)))  # type: ignore[attr-defined]
            if not ids:
                break
            session.execute(delete(model).where(model.id.in_(ids)))
            session.commit()
        total += len(ids)
        if len(ids) < BATCH:
            break
    return total
