"""The per-device chain ``offer | install | finalize``.

``offer`` and ``install`` tell the device what to do, park the rest of the chain and end with
``Ignore`` (no result, chain not dispatched, message acknowledged): waiting for a device costs no
worker slot. Ingest or the reconciler resumes the parked rest. Every step reads SQL first and is safe
to run twice for the same (update, attempt): parking is set-if-absent, and a finalize marker lets only
one chain per update reach the wave's chord.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from orchestrator.models import Device, DeviceUpdate, Firmware, Rollout, utcnow
from orchestrator.portal import device_message
from orchestrator.protocol import Stage
from orchestrator.services.desired_state import clear_desired_message, desired_message
from orchestrator.services.rollout_engine import halt_if_threshold_reached, policy_of
from orchestrator.state_machines import (
    UPDATE_AWAITING_INSTALL,
    UPDATE_END_STATES,
    UPDATE_FAILURE_STATES,
    UPDATE_IN_FLIGHT,
    RolloutState,
    UpdateEvent,
    UpdateState,
)
from orchestrator.transitions import transition_update
from orchestrator.worker.runtime import Runtime

log = logging.getLogger(__name__)


def _rest_of_chain(task: Task[Any, Any]) -> list[dict[str, Any]]:
    return list(task.request.chain or [])


def _own_signature(task: Task[Any, Any]) -> dict[str, Any]:
    """This task as a fresh immutable signature that keeps its chord membership (for re-entry)."""
    sig = task.signature_from_request()
    for option in ("task_id", "chain", "link", "link_error", "retries", "headers", "stamped_headers"):
        sig.options.pop(option, None)
    sig.set(immutable=True)
    return dict(sig)


def _portal(du: DeviceUpdate, running_version: str | None = None) -> tuple[str, bytes]:
    return device_message(
        rollout_id=du.rollout_id,
        device_id=du.device_id,
        update_id=du.id,
        state=str(du.state),
        attempt=du.attempt,
        progress=du.progress,
        error=du.error_code,
        running_version=running_version,
    )


def _reenter_at_offer(rt: Runtime, task: Task[Any, Any], du: DeviceUpdate, policy_backoff: float) -> None:
    """A RETRYING update starts over at offer after the backoff; this chain then stops."""
    from orchestrator.worker import tasks

    rest = [*_rest_of_chain(task), _own_signature(task)]
    if task.name == tasks.finalize.name:
        rest.append(dict(tasks.install.si(du.id)))
    tasks.offer.si(du.id).apply_async(countdown=policy_backoff, chain=rest)
    log.info("update %s attempt %s failed; retrying in %.1fs", du.id, du.attempt, policy_backoff)


def offer(rt: Runtime, task: Task[Any, Any], update_id: int) -> None:
    """QUEUED -> OFFERED and publish the download stage, or wait for a slot / for resume."""
    store = rt.store
    with rt.sessions() as session:
        du = session.get(DeviceUpdate, update_id)
        if du is None:
            raise Ignore()
        rollout = session.get_one(Rollout, du.rollout_id)
        firmware = session.get_one(Firmware, rollout.firmware_id)
        policy = policy_of(rollout)
        if du.state in UPDATE_END_STATES:
            return  # canceled while queued: let install/finalize pass through to the chord
        if du.state == UpdateState.RETRYING:
            transition_update(session, du, UpdateEvent.REQUEUE)
            session.commit()
        if du.state in (UpdateState.PENDING, UpdateState.QUEUED) and rollout.status in (
            RolloutState.ABORTED,
            RolloutState.HALTED,
        ):
            if du.state == UpdateState.PENDING:
                transition_update(session, du, UpdateEvent.ENQUEUE)
            transition_update(session, du, UpdateEvent.CANCEL, error_code="canceled")
            session.commit()
            rt.publisher.publish(*_portal(du))
            return
        if du.state == UpdateState.PENDING:
            transition_update(session, du, UpdateEvent.ENQUEUE)
            session.commit()
        if du.state == UpdateState.QUEUED:
            runnable = rollout.status == RolloutState.RUNNING
            if not runnable or not store.acquire_slot(rollout.id, du.id, policy.max_in_flight):
                store.park(du.id, du.attempt, "slot", [*_rest_of_chain(task), _own_signature(task)])
                store.enqueue_waiting(rollout.id, du.id, du.attempt)
                # A slot may have been freed between our check and the park: wake the queue once.
                if runnable and store.slots_in_use(rollout.id) < policy.max_in_flight:
                    store.release_waiting(rollout.id, 1)
                raise Ignore()
            deadline = utcnow() + timedelta(seconds=policy.download_timeout_s)
            transition_update(session, du, UpdateEvent.OFFER, deadline_at=deadline)
            session.commit()
        if du.state not in UPDATE_IN_FLIGHT:
            raise Ignore()  # an install step already runs for this attempt
        # Park before the device can hear of it: a fast device's VERIFIED must find the continuation.
        # A redelivered offer whose continuation still waits publishes again (retained, idempotent).
        if store.park(du.id, du.attempt, "verified", _rest_of_chain(task)) == "claimed":
            raise Ignore()  # the chain already moved on without this run
        topic, payload = desired_message(
            rt.settings,
            update_id=du.id,
            attempt=du.attempt,
            stage=Stage.DOWNLOAD,
            device_id=du.device_id,
            firmware=firmware,
        )
        rt.publisher.publish_many([(topic, payload), _portal(du)])
        store.mark_dirty(rollout.id)
    raise Ignore()


def install(rt: Runtime, task: Task[Any, Any], update_id: int) -> None:
    """Publish the install stage once VERIFIED and park until an end state."""
    with rt.sessions() as session:
        du = session.get(DeviceUpdate, update_id)
        if du is None:
            raise Ignore()
        if du.state in UPDATE_END_STATES:
            return
        rollout = session.get_one(Rollout, du.rollout_id)
        firmware = session.get_one(Firmware, rollout.firmware_id)
        policy = policy_of(rollout)
        if du.state == UpdateState.RETRYING:
            _reenter_at_offer(rt, task, du, policy.backoff(du.attempt))
            raise Ignore()
        if du.state not in UPDATE_AWAITING_INSTALL:
            # Resumed early (e.g. a report skipped VERIFIED but is not past it): wait for VERIFIED again.
            rt.store.park(du.id, du.attempt, "verified", [*_rest_of_chain(task), _own_signature(task)])
            raise Ignore()
        if rt.store.park(du.id, du.attempt, "done", _rest_of_chain(task)) == "claimed":
            raise Ignore()
        if du.state == UpdateState.VERIFIED:
            du.deadline_at = utcnow() + timedelta(seconds=policy.install_timeout_s)
        session.commit()  # ends the transaction before talking to the broker
        message = desired_message(
            rt.settings,
            update_id=du.id,
            attempt=du.attempt,
            stage=Stage.INSTALL,
            device_id=du.device_id,
            firmware=firmware,
        )
        rt.publisher.publish(*message)
    raise Ignore()


def finalize(rt: Runtime, task: Task[Any, Any], update_id: int) -> str:
    """End of one device's chain: release its slot, clear its desired doc, count it for the wave."""
    with rt.sessions() as session:
        du = session.get(DeviceUpdate, update_id)
        if du is None:
            raise Ignore()
        rollout = session.get_one(Rollout, du.rollout_id)
        if du.state == UpdateState.RETRYING:
            _reenter_at_offer(rt, task, du, policy_of(rollout).backoff(du.attempt))
            raise Ignore()
        if du.state not in UPDATE_END_STATES:
            log.warning("finalize of update %s in %s: waiting again for an end state", du.id, du.state)
            rt.store.park(du.id, du.attempt, "done", [_own_signature(task)])
            raise Ignore()
        if not rt.store.mark_finalized(du.id, task.request.id or ""):
            raise Ignore()  # a duplicate chain; the first one already counted for the wave
        started = du.offered_at is not None
        device = session.get(Device, du.device_id)
        messages = [_portal(du, device.firmware_version if device else None)]
        if started:
            messages.append(clear_desired_message(du.device_id))
        rt.publisher.publish_many(messages)
        rt.store.release_slot(rollout.id, du.id)
        rt.store.mark_dirty(rollout.id)
        state, failed = str(du.state), du.state in UPDATE_FAILURE_STATES
        rollout_id, status = rollout.id, rollout.status
    if failed:
        halt_if_threshold_reached(rt, rollout_id)
    if status == RolloutState.RUNNING:
        policy = policy_of(rollout)
        free = policy.max_in_flight - rt.store.slots_in_use(rollout_id)
        if free > 0:
            rt.store.release_waiting(rollout_id, free)
    return state
