"""Device inventory writes from operators: registering a device ahead of its first connection.

Devices also register themselves through their retained ``info`` topic (see ``orchestrator.ingest``);
both paths produce the same row and the same ``device_registered`` event.
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.aws_jobs import PROTOCOL as AWS_PROTOCOL
from orchestrator.errors import AlreadyExists, InvalidInput, NotFound
from orchestrator.models import Device, Event, utcnow
from orchestrator.protocol import DEVICE_ID_PATTERN

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
"""Models and firmware versions: the same rule as firmware images, so every model can be targeted."""
LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"
"""Label keys: letters, digits and ``. _ / -``; they are used as JSON paths when filtering."""
MAX_LABELS = 32
MAX_LABEL_VALUE = 128

_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_THING = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_NAME = re.compile(NAME_PATTERN)
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)


def check_labels(labels: dict[str, str], *, field: str = "labels") -> None:
    """Raise InvalidInput unless ``labels`` has at most MAX_LABELS well-formed key/value pairs."""
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"at most {MAX_LABELS} labels", field=field)
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise InvalidInput(f"label key {key!r} must match {LABEL_KEY_PATTERN}", field=f"{field}.{key}")
        if len(value) > MAX_LABEL_VALUE:
            raise InvalidInput(
                f"label value longer than {MAX_LABEL_VALUE} characters", field=f"{field}.{key}"
            )


def register_device(
    session: Session,
    *,
    device_id: str,
    model: str,
    firmware_version: str,
    labels: dict[str, str] | None = None,
    actor: str = "operator",
    protocol: str = "fleet",
) -> Device:
    """Add a device to the inventory (offline until it connects). Commits.

    A device of protocol ``aws-jobs`` counts as online from the start: the AWS Jobs API has no
    presence, and its jobs wait for it in the queue as they would on AWS. Its id must also be a
    valid AWS thing name.

    Preconditions: ``device_id`` matches ``protocol.DEVICE_ID_PATTERN`` and is not registered yet
    (else AlreadyExists); ``model`` and ``firmware_version`` match NAME_PATTERN; labels pass
    :func:`check_labels`.
    """
    if not _DEVICE_ID.match(device_id):
        raise InvalidInput(f"device id must match {DEVICE_ID_PATTERN}", field="id")
    for field, value in (("model", model), ("firmware_version", firmware_version)):
        if not _NAME.match(value):
            raise InvalidInput(f"{field} {value!r} must match {NAME_PATTERN}", field=field)
    if protocol not in ("fleet", AWS_PROTOCOL):
        raise InvalidInput(f"protocol must be fleet or {AWS_PROTOCOL}", field="protocol")
    if protocol == AWS_PROTOCOL and not _THING.match(device_id):
        raise InvalidInput("an aws-jobs device id must be a thing name: letters, digits, _ and -", field="id")
    labels = dict(labels or {})
    check_labels(labels)
    if session.scalar(select(Device.id).where(Device.id == device_id)) is not None:
        raise AlreadyExists(f"device {device_id} is registered already", field="id")
    now = utcnow()
    device = Device(
        id=device_id,
        model=model,
        firmware_version=firmware_version,
        labels=labels,
        online=protocol == AWS_PROTOCOL,
        protocol=protocol,
        created_at=now,
    )
    session.add(device)
    session.add(
        Event(
            kind="inventory",
            name="device_registered",
            device_id=device_id,
            detail={
                "actor": actor,
                "model": model,
                "firmware_version": firmware_version,
                "protocol": protocol,
            },
            created_at=now,
        )
    )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise AlreadyExists(f"device {device_id} is registered already", field="id") from None
    return device


def get_device(session: Session, device_id: str) -> Device:
    """The device with ``device_id``; NotFound otherwise."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id} does not exist", field="device_id")
    return device


TAG_PATTERN = LABEL_KEY_PATTERN
"""Operator tags: the same rule as label keys (letters, digits and ``. _ / -``)."""
MAX_TAGS = 32
MAX_TAGGED_AT_ONCE = 10_000
_TAG = re.compile(TAG_PATTERN)


def set_tags(
    session: Session,
    device_ids: list[str],
    *,
    add: list[str] = [],  # noqa: B006 - read only
    remove: list[str] = [],  # noqa: B006 - read only
    actor: str = "operator",
) -> list[Device]:
    """Add and remove operator tags on every given device; returns the devices. Commits.

    Tags are the operator's: what a device reports about itself (labels) never changes them.
    Preconditions: every device exists (else NotFound naming one), tags match TAG_PATTERN, a device
    ends with at most MAX_TAGS tags, at most MAX_TAGGED_AT_ONCE devices per call.
    """
    if not add and not remove:
        raise InvalidInput("give tags to add or to remove", field="add")
    if len(device_ids) > MAX_TAGGED_AT_ONCE:
        raise InvalidInput(f"at most {MAX_TAGGED_AT_ONCE} devices per call", field="device_ids")
    for field, tags in (("add", add), ("remove", remove)):
        for tag in tags:
            if not _TAG.match(tag):
                raise InvalidInput(f"tag {tag[:70]!r} must match {TAG_PATTERN}", field=field)
    unique = list(dict.fromkeys(device_ids))
    devices = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(unique)))}
    missing = [d for d in unique if d not in devices]
    if missing:
        raise NotFound(f"device {missing[0]} does not exist ({len(missing)} unknown)", field="device_ids")
    now = utcnow()
    changed: list[str] = []
    for device_id in unique:
        device = devices[device_id]
        tags = sorted((set(device.tags or ()) | set(add)) - set(remove))
        if len(tags) > MAX_TAGS:
            raise InvalidInput(f"device {device_id} would carry more than {MAX_TAGS} tags", field="add")
        if tags != sorted(device.tags or ()):
            device.tags = tags
            changed.append(device_id)
    if changed:
        session.add_all(
            Event(
                kind="operator",
                name="device_tagged",
                device_id=device_id,
                detail={"actor": actor, "add": add, "remove": remove},
                created_at=now,
            )
            for device_id in changed
        )
    session.commit()
    return [devices[d] for d in unique]
