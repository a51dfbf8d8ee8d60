"""The offer step: admit QUEUED device updates into flight under ``max_in_flight``, and tell devices.

Admission is a hard cap. Each run reads the rollout's ``admission_seq``, counts the updates in
flight, picks up to the free slots of QUEUED updates (oldest first), and commits their
QUEUED -> OFFERED together with a compare-and-set of ``admission_seq`` (and ``status = RUNNING``).
Two admissions can therefore never both fill the same free slots: the later one's compare-and-set
fails and it starts over. Only admission adds to the in-flight set; finishing updates only leave it.

A device that still has an update in flight in another rollout waits (it is never displaced).
The desired documents are published after the commit; if that is lost, the reconciler publishes
them again for rows that stay OFFERED.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import lru_cache

from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, aliased

from orchestrator.engine.desired import desired_message
from orchestrator.engine.job_notices import AWS_THINGS, offer_notices
from orchestrator.engine.runtime import Runtime
from orchestrator.models import Device, DeviceUpdate, Firmware, Rollout, utcnow
from orchestrator.pacing import rate_room
from orchestrator.policy import policy_of
from orchestrator.portal import device_message
from orchestrator.protocol import Stage
from orchestrator.state_machines import UPDATE_IN_FLIGHT, UPDATE_SOAK, RolloutState, UpdateEvent, UpdateState
from orchestrator.transitions import MovedRow, bulk_transition_where

log = logging.getLogger(__name__)

# Most devices admitted by one run; a run that could admit more sends the offer step again, so
# install and finalize steps queued meanwhile run first (steps already in flight before new offers).
ADMIT_CHUNK = 500
CAS_ATTEMPTS = 8


@lru_cache(maxsize=256)
def _firmware(database_url: str, firmware_id: int) -> Firmware:
    """Firmware rows are immutable: read each once per process."""
    from orchestrator.db import session_factory

    with session_factory(database_url)() as session:
        firmware = session.get_one(Firmware, firmware_id)
        session.expunge(firmware)
        return firmware


def firmware_of(rt: Runtime, firmware_id: int) -> Firmware:
    return _firmware(rt.settings.database_url, firmware_id)


def in_flight_count(session: Session, rollout_id: int) -> int:
    return int(
        session.scalar(
            select(func.count()).where(
                DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.state.in_(UPDATE_IN_FLIGHT)
            )
        )
        or 0
    )


def _candidates(session: Session, rollout_id: int, limit: int) -> list[int]:
    other = aliased(DeviceUpdate)
    busy_elsewhere = exists().where(
        other.device_id == DeviceUpdate.device_id,
        other.rollout_id != rollout_id,
        other.state.in_((*UPDATE_IN_FLIGHT, *UPDATE_SOAK)),
    )
    # An offline device holds no slot: it is offered once its presence says it is back.
    return list(
        session.scalars(
            select(DeviceUpdate.id)
            .join(Device, Device.id == DeviceUpdate.device_id)
            .where(
                DeviceUpdate.rollout_id == rollout_id,
                DeviceUpdate.state == UpdateState.QUEUED,
                Device.online.is_(True),
                ~busy_elsewhere,
            )
            .order_by(DeviceUpdate.id)
            .limit(limit)
        )
    )


def _admit_once(rt: Runtime, rollout_id: int) -> tuple[list[MovedRow], bool, int] | None:
    """One admission transaction: (admitted rows, more may be admitted, firmware id); None when the
    compare-and-set lost to a concurrent admission or status change."""
    with rt.sessions() as session:
        row = session.execute(
            select(
                Rollout.status,
                Rollout.admission_seq,
                Rollout.created_at,
                Rollout.started_at,
                Rollout.policy,
                Rollout.firmware_id,
            ).where(Rollout.id == rollout_id)
        ).one_or_none()
        if row is None or row.status != RolloutState.RUNNING:
            return [], False, 0
        policy = policy_of(rollout_id, row.created_at, row.policy)
        now = utcnow()
        if policy.ended(now):
            return [], False, row.firmware_id  # the reconciler skips what was not reached
        free = policy.max_in_flight - in_flight_count(session, rollout_id)
        room = rate_room(session, rollout_id, policy, row.started_at, now)
        if room is not None:
            free = min(free, room)  # the reconciler admits again as the minute slides
        if free <= 0:
            return [], False, row.firmware_id
        wanted = min(free, ADMIT_CHUNK)
        ids = _candidates(session, rollout_id, wanted)
        if not ids:
            return [], False, row.firmware_id
        claimed = session.execute(
            update(Rollout)
            .where(
                Rollout.id == rollout_id,
                Rollout.admission_seq == row.admission_seq,
                Rollout.status == RolloutState.RUNNING,
            )
            .values(admission_seq=row.admission_seq + 1)
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            return None
        # Stamped after the candidates were read: an update of the same device in another rollout
        # that ended just before is then always seen to end before this one was offered.
        offered = utcnow()
        moved = bulk_transition_where(
            session,
            UpdateEvent.OFFER,
            UpdateState.QUEUED,
            DeviceUpdate.id.in_(ids),
            values={
                "offered_at": offered,
                "deadline_at": offered + timedelta(seconds=policy.download_timeout_s),
            },
        )
        session.commit()
        return moved, len(ids) == wanted and free > wanted, row.firmware_id


def admit(rt: Runtime, rollout_id: int) -> int:
    """Admit what fits now (at most ADMIT_CHUNK) and publish their desired documents; returns how many.

    Rollout must be RUNNING, else nothing happens. Sends itself again when more could be admitted.
    """
    for attempt in range(CAS_ATTEMPTS):
        try:
            outcome = _admit_once(rt, rollout_id)
        except OperationalError as exc:
            # SQLite refuses to upgrade a read snapshot another writer overtook: try again.
            if attempt == CAS_ATTEMPTS - 1:
                raise
            log.debug("admission for rollout %s: %s; retrying", rollout_id, exc)
            outcome = None
        if outcome is not None:
            break
        time.sleep(0.005 * (attempt + 1))
    else:
        log.info("admission for rollout %s kept losing races; the reconciler retries", rollout_id)
        return 0
    moved, more, firmware_id = outcome
    if moved:
        publish_offers(rt, moved, firmware_id)
        rt.marks.mark(rollout_id)
    if more:
        rt.dispatch.offer(rollout_id)
    return len(moved)


def publish_offers(rt: Runtime, rows: Sequence[MovedRow], firmware_id: int) -> None:
    """The download-stage desired document and the portal document of each offered row."""
    firmware = firmware_of(rt, firmware_id)
    messages: list[tuple[str, bytes]] = []
    with rt.sessions() as session:
        aws = AWS_THINGS.among(session, (row.device_id for row in rows), enabled=rt.settings.aws_jobs)
    jobs: list[tuple[str, bytes]] = []
    for row in rows:
        if row.device_id in aws:
            jobs += offer_notices(rt.settings, firmware, row.device_id, row.id, row.attempt)
        else:
            messages.append(
                desired_message(
                    rt.settings,
                    update_id=row.id,
                    attempt=row.attempt,
                    stage=Stage.DOWNLOAD,
                    device_id=row.device_id,
                    firmware=firmware,
                )
            )
        messages.append(
            device_message(
                rollout_id=row.rollout_id,
                device_id=row.device_id,
                update_id=row.id,
                state=str(UpdateState.OFFERED),
                attempt=row.attempt,
            )
        )
    rt.publisher.publish_many(messages)
    if jobs:
        rt.publisher.publish_many(jobs, retain=False)
