"""The audit log, read-only: who did what, when, to which object, and how it ended."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AwareDatetime

from orchestrator.api.deps import DbSession, Viewer
from orchestrator.api.schemas import AuditOut, AuditPage, errors
from orchestrator.services import query_service
from orchestrator.services.query_service import MAX_LIMIT

router = APIRouter(prefix="/audit", tags=["audit"], responses=errors(401, 403, 422))
Short = Annotated[str | None, Query(max_length=140)]


@router.get("", response_model=AuditPage)
def list_audit(
    session: DbSession,
    _: Viewer,
    action: Annotated[
        str | None, Query(max_length=64, description="e.g. rollout.pause, or rollout.*")
    ] = None,
    actor: Annotated[str | None, Query(max_length=140, description="e.g. api:ops-alice, system")] = None,
    target_kind: Annotated[
        str | None, Query(max_length=32, description="rollout, firmware, device, ...")
    ] = None,
    target_id: Annotated[str | None, Query(max_length=128)] = None,
    outcome: Annotated[str | None, Query(max_length=32, description="ok, forbidden, conflict, ...")] = None,
    since: Annotated[AwareDatetime | None, Query(description="at or after this time")] = None,
    until: Annotated[AwareDatetime | None, Query(description="before this time")] = None,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> AuditPage:
    """Audit entries newest first. Entries are only ever added: the API has no way to change one."""
    page = query_service.list_audit(
        session,
        action=action,
        actor=actor,
        target_kind=target_kind,
        target_id=target_id,
        outcome=outcome,
        since=since,
        until=until,
        cursor=cursor,
        limit=limit,
    )
    return AuditPage(items=[AuditOut.model_validate(e) for e in page.items], next_cursor=page.next_cursor)
