"""Webhooks: HTTPS endpoints told of every rollout and device-update state change, signed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from orchestrator.api.deps import AppSettings, DbSession, Operator, Viewer, actor
from orchestrator.api.schemas import (
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveryOut,
    WebhookDeliveryPage,
    WebhookOut,
    errors,
)
from orchestrator.services import webhook_service
from orchestrator.services.query_service import MAX_LIMIT

router = APIRouter(prefix="/webhooks", tags=["webhooks"], responses=errors(401, 403, 422))
WebhookId = Annotated[int, Path(ge=1, le=2**31 - 1, description="webhook id")]


@router.post("", status_code=201, response_model=WebhookCreated, responses=errors(400))
def create_webhook(
    body: WebhookCreate, session: DbSession, settings: AppSettings, token: Operator
) -> WebhookCreated:
    """Register an endpoint. The answer carries its signing secret, shown only this once."""
    endpoint, secret = webhook_service.create_endpoint(
        session,
        url=body.url,
        events=body.events,
        description=body.description,
        server_key=settings.secret_key,
        actor=actor(token),
        allow_loopback=settings.webhook_allow_loopback,
    )
    return WebhookCreated(**WebhookOut.model_validate(endpoint).model_dump(), secret=secret)


@router.get("", response_model=list[WebhookOut])
def list_webhooks(session: DbSession, _: Viewer) -> list[WebhookOut]:
    return [WebhookOut.model_validate(e) for e in webhook_service.list_endpoints(session)]


@router.delete("/{webhook_id}", status_code=204, responses=errors(404))
def delete_webhook(webhook_id: WebhookId, session: DbSession, _: Operator) -> Response:
    """Stop delivering to it; its record and its deliveries stay readable."""
    webhook_service.deactivate_endpoint(session, webhook_id)
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=WebhookDeliveryPage, responses=errors(404))
def list_deliveries(
    webhook_id: WebhookId,
    session: DbSession,
    _: Viewer,
    status: Annotated[str | None, Query(max_length=16, description="PENDING, DELIVERED or FAILED")] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> WebhookDeliveryPage:
    """What was delivered to the endpoint, with each delivery's attempts and outcome, newest first."""
    page = webhook_service.list_deliveries(session, webhook_id, status=status, cursor=cursor, limit=limit)
    return WebhookDeliveryPage(
        items=[WebhookDeliveryOut.model_validate(d) for d in page.items], next_cursor=page.next_cursor
    )
