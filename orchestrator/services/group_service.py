"""Saved groups: named device filters (model, tags, labels, versions) that rollouts can target."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.errors import AlreadyExists, InvalidInput, NotFound
from orchestrator.models import DeviceGroup, Event, utcnow
from orchestrator.policy import DeviceFilter, Target
from orchestrator.services.device_service import NAME_PATTERN
from orchestrator.targeting import resolve_target

_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class GroupView:
    group: DeviceGroup
    devices: int


def create_group(
    session: Session, *, name: str, filter: DeviceFilter, actor: str = "operator"
) -> DeviceGroup:
    """Save a named filter. The name matches NAME_PATTERN and is new (else AlreadyExists). Commits."""
    if not _NAME.match(name):
        raise InvalidInput(f"group name must match {NAME_PATTERN}", field="name")
    if session.scalar(select(DeviceGroup.id).where(DeviceGroup.name == name)) is not None:
        raise AlreadyExists(f"group {name!r} exists already", field="name")
    now = utcnow()
    group = DeviceGroup(
        name=name, filter=filter.model_dump(mode="json", exclude_defaults=True), created_at=now
    )
    session.add(group)
    session.add(
        Event(kind="operator", name="group_created", detail={"actor": actor, "group": name}, created_at=now)
    )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise AlreadyExists(f"group {name!r} exists already", field="name") from None
    return group


def get_group(session: Session, name: str) -> DeviceGroup:
    group = session.scalar(select(DeviceGroup).where(DeviceGroup.name == name))
    if group is None:
        raise NotFound(f"group {name!r} does not exist", field="name")
    return group


def group_view(session: Session, group: DeviceGroup) -> GroupView:
    """The group with how many devices its filter selects now."""
    saved = DeviceFilter.model_validate(group.filter)
    return GroupView(group, len(resolve_target(session, Target(**saved.model_dump(), group=group.name))))


def list_groups(session: Session) -> list[DeviceGroup]:
    return list(session.scalars(select(DeviceGroup).order_by(DeviceGroup.name)))


def delete_group(session: Session, name: str, *, actor: str = "operator") -> None:
    """Remove a saved group. Rollouts that targeted it keep the filter they copied. Commits."""
    group = get_group(session, name)
    session.delete(group)
    session.add(
        Event(
            kind="operator", name="group_deleted", detail={"actor": actor, "group": name}, created_at=utcnow()
        )
    )
    session.commit()
