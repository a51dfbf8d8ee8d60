"""Rollouts: create (and start), list, status, per-device list, events, and operator actions.

Actions (pause, resume, abort) answer 200 with the rollout after the change; an action the
rollout's state does not allow (e.g. resume a COMPLETED rollout) is 409 ``illegal_transition``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy.orm import Session

from orchestrator.api.deps import DbSession, Operator, Viewer, actor
from orchestrator.api.schemas import (
    DeviceUpdateOut,
    DeviceUpdatePage,
    EventOut,
    EventPage,
    Name,
    Pacing,
    ProgressHistoryOut,
    ProgressPointOut,
    RolloutCreate,
    RolloutDetail,
    RolloutOut,
    RolloutPage,
    Tag,
    WaveProgress,
    errors,
)
from orchestrator.models import Rollout, utcnow
from orchestrator.services import query_service, rollout_service
from orchestrator.services.progress_history import progress_history
from orchestrator.services.query_service import MAX_LIMIT
from orchestrator.services.rollout_planner import create_rollout as plan_rollout
from orchestrator.state_machines import RolloutState, UpdateState

router = APIRouter(prefix="/rollouts", tags=["rollouts"], responses=errors(401, 403, 422))
RolloutId = Annotated[int, Path(ge=1, le=2**31 - 1, description="rollout id")]
Cursor = Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


def launch_rollout(session: Session, body: RolloutCreate, who: str) -> Rollout:
    """Plan the rollout (rows written in bulk, committed), then start it unless ``start_at`` lies
    ahead; the reconciler starts scheduled rollouts when their time comes."""
    rollout = plan_rollout(
        session,
        name=body.name,
        firmware_id=body.firmware_id,
        target=body.target,
        policy=body.policy,
        start_at=body.start_at,
        actor=who,
        supersede=body.supersede,
    )
    session.commit()
    if body.start_at is None or body.start_at <= utcnow():
        rollout = rollout_service.start_rollout(session, rollout.id, actor=who)
    return rollout


@router.post("", status_code=201, response_model=RolloutOut, responses=errors(400, 404, 409))
def create_rollout(body: RolloutCreate, session: DbSession, token: Operator) -> RolloutOut:
    """Plan a rollout and start it at once (status RUNNING), or at ``start_at`` (status SCHEDULED).

    Devices of another model or already on the target version are SKIPPED. 404 for an unknown
    firmware, 422 when the target selects no device or names unknown ones, 409 ``conflict`` naming
    the devices when some have an unfinished update in another rollout (see ``supersede``).
    """
    return RolloutOut.model_validate(launch_rollout(session, body, actor(token)))


@router.get("", response_model=RolloutPage)
def list_rollouts(
    session: DbSession,
    _: Viewer,
    status: Annotated[RolloutState | None, Query(description="only rollouts in this status")] = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> RolloutPage:
    """Rollouts, newest first."""
    page = query_service.list_rollouts(session, status=status, cursor=cursor, limit=limit)
    return RolloutPage(items=[RolloutOut.model_validate(r) for r in page.items], next_cursor=page.next_cursor)


@router.get("/{rollout_id}", response_model=RolloutDetail, responses=errors(404))
def rollout_status(rollout_id: RolloutId, session: DbSession, _: Viewer) -> RolloutDetail:
    """The rollout with its progress: counts per state, per-wave progress, percent done, ETA."""
    rollout, summary = query_service.rollout_detail(session, rollout_id)
    return RolloutDetail(
        **RolloutOut.model_validate(rollout).model_dump(),
        counts=summary.counts,
        percent=summary.percent,
        waves=[WaveProgress.model_validate(w) for w in summary.waves],
        eta_seconds=summary.eta_seconds,
        skipped=summary.skipped,
        pacing=Pacing.model_validate(summary.pacing) if summary.pacing is not None else None,
    )


@router.get("/{rollout_id}/devices", response_model=DeviceUpdatePage, responses=errors(404))
def rollout_devices(
    rollout_id: RolloutId,
    session: DbSession,
    _: Viewer,
    state: Annotated[UpdateState | None, Query(description="only device updates in this state")] = None,
    error_code: Annotated[
        str | None, Query(max_length=32, description="only updates that ended with it")
    ] = None,
    model: Annotated[Name | None, Query(description="device model")] = None,
    version: Annotated[Name | None, Query(description="running firmware version")] = None,
    online: Annotated[bool | None, Query(description="device online (true) or offline (false)")] = None,
    tag: Annotated[list[Tag], Query(max_length=20, description="operator tag, repeatable")] = [],  # noqa: B006
    q: Annotated[str | None, Query(min_length=1, max_length=128, description="part of the device id")] = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> DeviceUpdatePage:
    """The rollout's device updates ordered by device id, filtered; cursor pagination over any size."""
    page = query_service.list_rollout_updates(
        session,
        rollout_id,
        state=state,
        error_code=error_code,
        model=model,
        version=version,
        online=online,
        tags=tag,
        search=q,
        cursor=cursor,
        limit=limit,
    )
    items = [
        DeviceUpdateOut(
            id=row.update.id,
            device_id=row.update.device_id,
            wave_index=row.wave_index,
            state=str(row.update.state),
            attempt=row.update.attempt,
            progress=row.update.progress,
            error_code=row.update.error_code,
            offered_at=row.update.offered_at,
            finished_at=row.update.finished_at,
            updated_at=row.update.updated_at,
            stop_requested_at=row.update.stop_requested_at,
            running_version=row.running_version,
            online=row.online,
        )
        for row in page.items
    ]
    return DeviceUpdatePage(items=items, next_cursor=page.next_cursor)


@router.get("/{rollout_id}/progress", response_model=ProgressHistoryOut, responses=errors(404))
def rollout_progress(
    rollout_id: RolloutId,
    session: DbSession,
    _: Viewer,
    bucket_s: Annotated[
        int, Query(ge=10, le=86400, description="seconds between points; widened to keep at most 240")
    ] = 60,
) -> ProgressHistoryOut:
    """Succeeded, failed and in flight over time, rebuilt from the rollout's transition events."""
    history = progress_history(session, rollout_id, bucket_s=bucket_s)
    return ProgressHistoryOut(
        bucket_s=history.bucket_s,
        points=[ProgressPointOut.model_validate(p, from_attributes=True) for p in history.points],
    )


@router.get("/{rollout_id}/events", response_model=EventPage, responses=errors(404))
def rollout_events(
    rollout_id: RolloutId, session: DbSession, _: Viewer, cursor: Cursor = None, limit: Limit = 100
) -> EventPage:
    """The rollout's audit trail, newest first: transitions, device reports, operator actions."""
    page = query_service.list_rollout_events(session, rollout_id, cursor=cursor, limit=limit)
    return EventPage(items=[EventOut.model_validate(e) for e in page.items], next_cursor=page.next_cursor)


@router.post("/{rollout_id}/pause", response_model=RolloutOut, responses=errors(404, 409))
def pause_rollout(rollout_id: RolloutId, session: DbSession, token: Operator) -> RolloutOut:
    """RUNNING -> PAUSED: no new device starts; devices already offered the update finish."""
    return RolloutOut.model_validate(rollout_service.pause_rollout(session, rollout_id, actor=actor(token)))


@router.post("/{rollout_id}/resume", response_model=RolloutOut, responses=errors(404, 409))
def resume_rollout(rollout_id: RolloutId, session: DbSession, token: Operator) -> RolloutOut:
    """PAUSED -> RUNNING."""
    return RolloutOut.model_validate(rollout_service.resume_rollout(session, rollout_id, actor=actor(token)))


@router.post("/{rollout_id}/abort", response_model=RolloutOut, responses=errors(404, 409))
def abort_rollout(rollout_id: RolloutId, session: DbSession, token: Operator) -> RolloutOut:
    """SCHEDULED, RUNNING or PAUSED -> ABORTED: devices not started are CANCELED, started ones finish."""
    return RolloutOut.model_validate(rollout_service.abort_rollout(session, rollout_id, actor=actor(token)))
