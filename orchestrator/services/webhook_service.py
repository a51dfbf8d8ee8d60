"""Webhook endpoints operators register, and what was delivered to them."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.errors import InvalidInput, NotFound
from orchestrator.models import WebhookDelivery, WebhookEndpoint, utcnow
from orchestrator.services.query_service import Page, _check_limit, _page, decode_cursor
from orchestrator.webhooks import EVENT_KINDS, endpoint_secret, new_salt

DELIVERY_STATUSES = ("PENDING", "DELIVERED", "FAILED")


def check_url(url: str, *, allow_loopback: bool = False) -> None:
    """HTTPS to a public host. A host given as a private, loopback or link-local address is refused
    (the workers would post into the operator's own network); plain HTTP only to loopback, and only
    with FLEET_WEBHOOK_ALLOW_LOOPBACK (a receiver under development)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidInput("url must be an absolute https:// URL", field="url")
    if parts.username or parts.password:
        raise InvalidInput("url must not carry credentials; verify the signature instead", field="url")
    host = parts.hostname
    loopback = host in ("localhost",) or _address_is(host, "is_loopback")
    if loopback:
        if not allow_loopback:
            raise InvalidInput(
                "url points at this machine; set FLEET_WEBHOOK_ALLOW_LOOPBACK=true for a local test receiver",
                field="url",
            )
        return
    if parts.scheme == "http":
        raise InvalidInput("url must use https (plain http only to a loopback test receiver)", field="url")
    if any(
        _address_is(host, flag) for flag in ("is_private", "is_link_local", "is_reserved", "is_multicast")
    ):
        raise InvalidInput("url must name a public host, not a private or link-local address", field="url")


def _address_is(host: str, flag: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: resolved when delivering (a name pointing inward is a known limit)
    return bool(getattr(address, flag))


def create_endpoint(
    session: Session,
    *,
    url: str,
    events: list[str],
    description: str | None,
    server_key: str,
    actor: str = "operator",
    allow_loopback: bool = False,
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint; returns it and its signing secret (shown this once). Commits."""
    check_url(url, allow_loopback=allow_loopback)
    unknown = sorted(set(events) - set(EVENT_KINDS))
    if not events or unknown:
        raise InvalidInput(f"events must name some of {', '.join(EVENT_KINDS)}", field="events")
    endpoint = WebhookEndpoint(
        url=url,
        events=sorted(set(events)),
        description=description,
        salt=new_salt(),
        active=True,
        created_by=actor,
        created_at=utcnow(),
    )
    session.add(endpoint)
    session.commit()
    return endpoint, endpoint_secret(server_key, endpoint.salt)


def get_endpoint(session: Session, endpoint_id: int) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None:
        raise NotFound(f"webhook {endpoint_id} does not exist", field="webhook_id")
    return endpoint


def list_endpoints(session: Session) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).order_by(WebhookEndpoint.id)))


def deactivate_endpoint(session: Session, endpoint_id: int) -> WebhookEndpoint:
    """No new deliveries; its record and its deliveries stay readable. Idempotent. Commits."""
    endpoint = get_endpoint(session, endpoint_id)
    endpoint.active = False
    session.commit()
    return endpoint


def list_deliveries(
    session: Session,
    endpoint_id: int,
    *,
    status: str | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> Page[WebhookDelivery]:
    """The endpoint's deliveries, newest first, optionally in one status."""
    get_endpoint(session, endpoint_id)
    _check_limit(limit)
    if status is not None and status not in DELIVERY_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(DELIVERY_STATUSES)}", field="status")
    scope = f"webhook-{endpoint_id}"
    after = decode_cursor(scope, cursor, int)
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(WebhookDelivery.id < after)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    return _page(session.scalars(query).all(), limit, scope, lambda d: d.id)
