"""Webhook fan-out and delivery.

* **fan-out** (each reconciler pass): Events after the cursor that are state changes of a rollout
  or a device update become one delivery row per matching active endpoint, in the transaction that
  moves the cursor (a compare-and-set, so two passes never fan out one event twice). Only events a
  few seconds old are taken: on PostgreSQL ids are drawn before commit, so a younger id may still
  be followed by an older one committing.
* **delivery** (task ``fleet.webhook_deliver``, batches of ids): each PENDING delivery is claimed
  with a compare-and-set (so two workers never post it at once), POSTed with its signature, and
  marked DELIVERED on a 2xx; otherwise its next attempt is scheduled in SQL with exponential
  backoff, up to MAX_ATTEMPTS, then FAILED. The reconciler sends due deliveries again; nothing
  waits in a Celery countdown.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import or_, select, update

from orchestrator.engine.engine_metrics import engine_metrics
from orchestrator.engine.runtime import Runtime
from orchestrator.models import Event, WebhookCursor, WebhookDelivery, WebhookEndpoint, utcnow
from orchestrator.webhooks import SIGNATURE_HEADER, body_of, endpoint_secret, sign, state_change

log = logging.getLogger(__name__)
SETTLE = timedelta(seconds=3)
FANOUT_BATCH = 2000
MAX_ATTEMPTS = 8
CLAIM = timedelta(seconds=300)  # far beyond one post: TIMEOUT_S per read, few reads
LEASE = timedelta(seconds=30)
TIMEOUT_S = 10.0


def backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(3600, 2 ** max(0, attempts - 1)))


def fan_out(rt: Runtime) -> list[int]:
    """New delivery ids (none when no endpoint is registered: the cursor still moves)."""
    with rt.sessions() as session:
        cursor = session.get(WebhookCursor, 1)
        if cursor is None:
            session.add(WebhookCursor(id=1, last_event_id=0))
            session.commit()
            cursor = session.get_one(WebhookCursor, 1)
        start = cursor.last_event_id
        endpoints = list(session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.active.is_(True))))
        if not endpoints:
            newest = session.scalar(select(Event.id).order_by(Event.id.desc()).limit(1)) or start
            if newest != start:
                _move(session, start, newest)
                session.commit()
            return []
        settled = utcnow() - SETTLE
        events: list[Event] = []
        # In id order, stopping at the first event still settling: the cursor only ever passes
        # ids that were all read (an older id committing late is younger than SETTLE by then).
        for event in session.scalars(
            select(Event).where(Event.id > start).order_by(Event.id).limit(FANOUT_BATCH)
        ):
            if event.created_at >= settled:
                break
            events.append(event)
        if not events:
            return []
        rows: list[WebhookDelivery] = []
        for event in events:
            change = state_change(event)
            if change is None:
                continue
            kind, payload = change
            for endpoint in endpoints:
                if kind in endpoint.events:
                    rows.append(
                        WebhookDelivery(
                            endpoint_id=endpoint.id, event_id=event.id, kind=payload["type"], payload=payload
                        )
                    )
        if not _move(session, start, events[-1].id):
            session.rollback()
            return []  # another pass took these events
        session.add_all(rows)
        session.commit()
        return [r.id for r in rows]


def _move(session: Any, start: int, to: int) -> bool:
    moved = session.execute(
        update(WebhookCursor)
        .where(WebhookCursor.id == 1, WebhookCursor.last_event_id == start)
        .values(last_event_id=to)
        .execution_options(synchronize_session=False)
    ).rowcount
    return bool(moved == 1)


def take_due(rt: Runtime, limit: int = 500) -> list[int]:
    """PENDING deliveries of active endpoints whose next attempt is due and that no task holds.
    Each is leased for LEASE as it is handed over, so a later pass does not send it again while its
    message waits for a worker (and does, if that message was lost)."""
    now = utcnow()
    with rt.sessions() as session:
        ids = list(
            session.scalars(
                select(WebhookDelivery.id)
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .where(
                    WebhookDelivery.status == "PENDING",
                    WebhookDelivery.next_attempt_at <= now,
                    or_(WebhookDelivery.leased_until.is_(None), WebhookDelivery.leased_until < now),
                    or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now),
                    WebhookEndpoint.active.is_(True),
                )
                .order_by(WebhookDelivery.id)
                .limit(limit)
            )
        )
        if ids:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(ids))
                .values(leased_until=now + LEASE)
                .execution_options(synchronize_session=False)
            )
            session.commit()
        return ids


def deliver(rt: Runtime, delivery_ids: list[int]) -> int:
    """Post each due delivery once; returns how many were accepted (2xx) now.

    After one failure to an endpoint, its other deliveries in this batch are postponed unsent, so
    a dead receiver costs one timeout per batch, not one per delivery.
    """
    delivered = 0
    failing: set[int] = set()
    with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as client:
        for delivery_id in delivery_ids:
            claimed = _claim(rt, delivery_id)
            if claimed is None:
                continue
            delivery, endpoint = claimed
            if endpoint.id in failing:
                _postpone(rt, delivery)
                continue
            ok = _post(rt, client, delivery, endpoint)
            delivered += ok
            if not ok:
                failing.add(endpoint.id)
    return delivered


def _postpone(rt: Runtime, delivery: WebhookDelivery) -> None:
    with rt.sessions() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery.id)
            .values(
                claimed_until=None,
                leased_until=None,
                next_attempt_at=utcnow() + backoff(max(1, delivery.attempts)),
            )
            .execution_options(synchronize_session=False)
        )
        session.commit()


def _claim(rt: Runtime, delivery_id: int) -> tuple[WebhookDelivery, WebhookEndpoint] | None:
    now = utcnow()
    with rt.sessions() as session:
        taken = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == "PENDING",
                # due: a task that waited past its lease and meets a backoff set meanwhile waits too
                WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now),
                WebhookDelivery.endpoint_id.in_(
                    select(WebhookEndpoint.id).where(WebhookEndpoint.active.is_(True))
                ),
            )
            .values(claimed_until=now + CLAIM)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        session.commit()
        if taken != 1:
            return None
        delivery = session.get_one(WebhookDelivery, delivery_id)
        endpoint = session.get_one(WebhookEndpoint, delivery.endpoint_id)
        session.expunge_all()
        return delivery, endpoint


def _post(rt: Runtime, client: httpx.Client, delivery: WebhookDelivery, endpoint: WebhookEndpoint) -> int:
    body = body_of(delivery.payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "fleet-webhooks/1",
        SIGNATURE_HEADER: sign(endpoint_secret(rt.settings.secret_key, endpoint.salt), body),
        "Fleet-Event-Id": str(delivery.event_id),
        "Fleet-Delivery-Id": str(delivery.id),
    }
    status: int | None = None
    error: str | None = None
    metrics = engine_metrics()
    began = time.perf_counter()
    try:
        response = client.post(endpoint.url, content=body, headers=headers)
        status = response.status_code
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    metrics.webhook_seconds.observe(time.perf_counter() - began)
    attempts = delivery.attempts + 1
    now = utcnow()
    values: dict[str, Any] = {
        "attempts": attempts,
        "last_status": status,
        "last_error": error,
        "claimed_until": None,
    }
    if error is None:
        values.update(status="DELIVERED", delivered_at=now)
        metrics.webhook_posts.labels("delivered").inc()
    elif attempts >= MAX_ATTEMPTS:
        values.update(status="FAILED")
        metrics.webhook_posts.labels("failed").inc()
        log.warning("webhook delivery %s to %s failed for good: %s", delivery.id, endpoint.url, error)
    else:
        values.update(next_attempt_at=now + backoff(attempts), leased_until=None)
        metrics.webhook_posts.labels("retry").inc()
    with rt.sessions() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery.id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        session.commit()
    return 1 if error is None else 0
