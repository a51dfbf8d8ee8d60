"""Saved groups: named device filters that rollouts can target with ``{"group": NAME}``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from orchestrator.api.deps import DbSession, Operator, Viewer, actor
from orchestrator.api.schemas import GroupCreate, GroupOut, errors
from orchestrator.policy import DeviceFilter
from orchestrator.services import group_service
from orchestrator.services.device_service import NAME_PATTERN

router = APIRouter(prefix="/groups", tags=["groups"], responses=errors(401, 403, 422))
GroupName = Annotated[str, Path(pattern=NAME_PATTERN, description="group name")]


def _out(view: group_service.GroupView) -> GroupOut:
    group = view.group
    return GroupOut(name=group.name, filter=group.filter, created_at=group.created_at, devices=view.devices)


@router.post("", status_code=201, response_model=GroupOut, responses=errors(400, 409))
def create_group(body: GroupCreate, session: DbSession, token: Operator) -> GroupOut:
    """Save a named filter over model, operator tags, device labels and running versions.

    A rollout targeting the group copies the filter when it is created.
    """
    group = group_service.create_group(
        session,
        name=body.name,
        filter=DeviceFilter.model_validate(body.filter.model_dump()),
        actor=actor(token),
    )
    return _out(group_service.group_view(session, group))


@router.get("", response_model=list[GroupOut])
def list_groups(session: DbSession, _: Viewer) -> list[GroupOut]:
    """Every saved group, by name, with how many devices each selects now."""
    return [_out(group_service.group_view(session, g)) for g in group_service.list_groups(session)]


@router.get("/{name}", response_model=GroupOut, responses=errors(404))
def get_group(name: GroupName, session: DbSession, _: Viewer) -> GroupOut:
    return _out(group_service.group_view(session, group_service.get_group(session, name)))


@router.delete("/{name}", status_code=204, responses=errors(404))
def delete_group(name: GroupName, session: DbSession, token: Operator) -> Response:
    """Remove a saved group; rollouts that targeted it keep their copy of the filter."""
    group_service.delete_group(session, name, actor=actor(token))
    return Response(status_code=204)
