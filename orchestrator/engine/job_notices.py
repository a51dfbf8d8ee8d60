"""What the engine tells a device of protocol ``aws-jobs`` instead of a retained ``desired``
document: ``notify`` and ``notify-next`` on its ``$aws/things/T/jobs/`` topics (not retained, as on
AWS; a device that was away asks with ``start-next`` or ``get``, which ingest answers from SQL).

Such a device runs its job to the end by itself, so only the offer (stage download) and a stop
(stage cancel) have an AWS counterpart; install, soak and rollback documents are not sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.aws_jobs import PROTOCOL, JobStatus, execution, job_document, notices, summary
from orchestrator.config import Settings
from orchestrator.engine.desired import firmware_ref
from orchestrator.models import Device, Firmware, utcnow

_CHECK_EVERY_S = 30.0


class AwsThings:
    """Which devices speak the AWS Jobs API. While none is registered (checked twice a minute),
    the hot paths pay no query for it."""

    def __init__(self) -> None:
        self._any = False
        self._checked = -1e9

    def among(self, session: Session, device_ids: Iterable[str], *, enabled: bool = True) -> set[str]:
        """Those of ``device_ids`` that speak the AWS Jobs API; none when the API is not served
        (``FLEET_AWS_JOBS=false``: their notices could not be published)."""
        ids = set(device_ids)
        if not ids or not enabled:
            return set()
        now = time.monotonic()
        if not self._any and now - self._checked < _CHECK_EVERY_S:
            return set()
        if not self._any:
            self._checked = now
            self._any = (
                session.scalar(select(Device.id).where(Device.protocol == PROTOCOL).limit(1)) is not None
            )
            if not self._any:
                return set()
        return set(session.scalars(select(Device.id).where(Device.id.in_(ids), Device.protocol == PROTOCOL)))


def offer_notices(
    settings: Settings, firmware: Firmware, device_id: str, update_id: int, attempt: int
) -> list[tuple[str, bytes]]:
    """A new execution is queued: it is the device's only pending one (a device has one update in
    flight at a time), so it is also the next."""
    now = utcnow()
    queued = summary(update_id, attempt, 1, now, None, now)
    document = job_document(firmware_ref(settings, firmware, device_id).model_dump(), update_id, attempt)
    next_execution = execution(queued, device_id, JobStatus.QUEUED, {}, document)
    return notices(device_id, time.time(), [queued], [], next_execution)


AWS_THINGS = AwsThings()
