"""The install and finalize steps, and the re-publication of an offer; each acts on a batch of updates.

* **install** (sent by ingest when a device reported VERIFIED): publish the install-stage desired
  document to every update of the batch that is still VERIFIED, if its rollout's maintenance
  window has room now. Its deadline was set when VERIFIED was applied, so then the step writes
  nothing and running it twice only repeats a retained publish. Outside a window it moves the
  row's redrive time and deadline to the next window instead.
* **finalize** (sent when updates reached an end state): clear the device's desired document,
  publish its final portal document, mark the row finalized, then check the failure threshold,
  close waves that have nothing open and admit devices into the slots just freed.
* **republish** (sent by the reconciler for updates that stopped moving, and by ingest for updates
  that began soaking or rolling back): the document of the stage the update is in. A device that
  already got it and moved on answers with its current state (protocol §3), which recovers a
  report the broker lost in a crash.

A step that finds a row elsewhere than it expects leaves it alone: whatever moved it on also sent
the step that follows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update

from orchestrator.engine.admission import admit, firmware_of
from orchestrator.engine.desired import clear_desired_message, desired_message
from orchestrator.engine.job_notices import AWS_THINGS, offer_notices
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.waves import close_wave, halt_if_threshold_reached, wave_is_open
from orchestrator.maintenance_windows import current_window
from orchestrator.models import Device, DeviceUpdate, Rollout, utcnow
from orchestrator.pacing import install_time
from orchestrator.policy import policy_of
from orchestrator.portal import device_message
from orchestrator.protocol import Stage
from orchestrator.state_machines import (
    UPDATE_AWAITING_INSTALL,
    UPDATE_END_STATES,
    UPDATE_FAILURE_STATES,
    UPDATE_STOPPABLE,
    RolloutState,
    UpdateState,
)

log = logging.getLogger(__name__)
_DOWNLOAD_STAGE = (UpdateState.OFFERED, UpdateState.DOWNLOADING, UpdateState.DOWNLOADED)
_INSTALL_STAGE = tuple(s for s in UPDATE_AWAITING_INSTALL if s != UpdateState.VERIFIED)


def _publish_stage(
    rt: Runtime, update_ids: Sequence[int], states: Sequence[UpdateState], stage: Stage
) -> int:
    """The ``stage`` document for each of ``update_ids`` in ``states``. Rows an operator asked to
    stop get stage ``cancel`` only (and only while they are stoppable)."""
    stopping = stage is Stage.CANCEL
    with rt.sessions() as session:
        rows = session.execute(
            select(
                DeviceUpdate.id,
                DeviceUpdate.attempt,
                DeviceUpdate.device_id,
                Rollout.firmware_id,
                Rollout.id,
                Rollout.created_at,
                Rollout.policy,
                DeviceUpdate.state,
            )
            .join(Rollout, Rollout.id == DeviceUpdate.rollout_id)
            .where(
                DeviceUpdate.id.in_(list(update_ids)),
                DeviceUpdate.state.in_(states),
                # A stop request only changes what a not-yet-installing row is told.
                DeviceUpdate.stop_requested_at.is_not(None)
                if stopping
                else or_(
                    DeviceUpdate.stop_requested_at.is_(None), DeviceUpdate.state.not_in(UPDATE_STOPPABLE)
                ),
            )
        ).all()
    messages = []
    jobs: list[tuple[str, bytes]] = []
    now = utcnow()
    with rt.sessions() as session:
        aws = AWS_THINGS.among(session, (row[2] for row in rows), enabled=rt.settings.aws_jobs)
    for update_id, attempt, device_id, firmware_id, rollout_id, created_at, policy_doc, state in rows:
        if device_id in aws:
            # An AWS Jobs device runs its job to the end by itself once it started it: only an
            # offer it has not taken up yet is announced (again). Stops are handled in SQL
            # (services/device_actions.py) and need no notice.
            if stage is Stage.DOWNLOAD and state == UpdateState.OFFERED:
                jobs += offer_notices(
                    rt.settings, firmware_of(rt, firmware_id), device_id, update_id, attempt
                )
            continue
        heartbeat: float | None = None
        install_before: float | None = None
        policy = policy_of(rollout_id, created_at, policy_doc)
        if stage is Stage.SOAK and policy.soak is not None:
            heartbeat = policy.soak.heartbeat_s
        if stage is Stage.INSTALL and policy.windows:
            # A device that hears this late (it was away) must not begin after the window's room ends.
            window = current_window(policy.window_specs, now)
            if window is not None:
                install_before = (window[1] - timedelta(seconds=policy.install_timeout_s)).timestamp()
        messages.append(
            desired_message(
                rt.settings,
                update_id=update_id,
                attempt=attempt,
                stage=stage,
                device_id=device_id,
                firmware=firmware_of(rt, firmware_id),
                heartbeat_s=heartbeat,
                install_before=install_before,
            )
        )
    if messages:
        rt.publisher.publish_many(messages)
    if jobs:
        rt.publisher.publish_many(jobs, retain=False)
    if messages or jobs:
        rt.marks.mark(*{row[4] for row in rows})
    return len(messages) + len(jobs) // 2


def install(rt: Runtime, update_ids: Sequence[int]) -> int:
    """Send the install stage to updates that are VERIFIED and whose rollout's maintenance window
    has room for the install now; returns how many were told.

    The others wait in SQL, holding no worker: their redrive time becomes the next window with room
    (the reconciler sends this step again then) and their install deadline counts from it. When no
    window with room comes within the horizon, nothing is sent and the install deadline stands.
    """
    now = utcnow()
    ready: list[int] = []
    with rt.sessions() as session:
        rows = session.execute(
            select(DeviceUpdate.id, Rollout.id, Rollout.created_at, Rollout.policy)
            .join(Rollout, Rollout.id == DeviceUpdate.rollout_id)
            .join(Device, Device.id == DeviceUpdate.device_id)
            .where(
                DeviceUpdate.id.in_(list(update_ids)),
                DeviceUpdate.state == UpdateState.VERIFIED,
                DeviceUpdate.stop_requested_at.is_(None),  # an operator asked it to stop: never install
                # Away: the reconciler re-sends this once it is back, and the window is checked then.
                Device.online.is_(True),
            )
        ).all()
        waiting: dict[datetime, list[int]] = defaultdict(list)
        install_timeout: dict[datetime, float] = {}
        for update_id, rollout_id, created_at, policy_doc in rows:
            policy = policy_of(rollout_id, created_at, policy_doc)
            at = install_time(policy, now)
            if at is None:
                continue  # no window with room ahead: never installs; its install deadline ends it
            if at <= now:
                ready.append(update_id)
            else:
                waiting[at].append(update_id)
                install_timeout[at] = max(install_timeout.get(at, 0.0), policy.install_timeout_s)
        for at, ids in waiting.items():
            session.execute(
                update(DeviceUpdate)
                .where(DeviceUpdate.id.in_(ids), DeviceUpdate.state == UpdateState.VERIFIED)
                .values(
                    redrive_at=at,
                    deadline_at=at + timedelta(seconds=install_timeout[at]),
                    version=DeviceUpdate.version + 1,
                )
                .execution_options(synchronize_session=False)
            )
        if waiting:
            session.commit()
            log.info("%d verified update(s) wait for a maintenance window", sum(map(len, waiting.values())))
    return _publish_stage(rt, ready, (UpdateState.VERIFIED,), Stage.INSTALL) if ready else 0


def republish(rt: Runtime, update_ids: Sequence[int]) -> int:
    """Send each in-flight update's current stage document again (lost document, or lost report).

    A VERIFIED update goes through :func:`install`, so a re-send never installs outside a window;
    an update an operator asked to stop gets stage ``cancel`` instead of its stage.
    """
    told = _publish_stage(rt, update_ids, UPDATE_STOPPABLE, Stage.CANCEL)
    told += _publish_stage(rt, update_ids, _DOWNLOAD_STAGE, Stage.DOWNLOAD)
    told += install(rt, update_ids)
    told += _publish_stage(rt, update_ids, _INSTALL_STAGE, Stage.INSTALL)
    told += _publish_stage(rt, update_ids, (UpdateState.SOAKING,), Stage.SOAK)
    return told + _publish_stage(rt, update_ids, (UpdateState.ROLLING_BACK,), Stage.ROLLBACK)


def finalize(rt: Runtime, update_ids: Sequence[int]) -> int:
    """End of each update's chain; returns how many were finalized now (duplicates count zero)."""
    with rt.sessions() as session:
        rows = session.execute(
            select(
                DeviceUpdate.id,
                DeviceUpdate.rollout_id,
                DeviceUpdate.wave_id,
                DeviceUpdate.device_id,
                DeviceUpdate.state,
                DeviceUpdate.attempt,
                DeviceUpdate.progress,
                DeviceUpdate.error_code,
                DeviceUpdate.offered_at,
            ).where(
                DeviceUpdate.id.in_(list(update_ids)),
                DeviceUpdate.state.in_(UPDATE_END_STATES),
                DeviceUpdate.finalized_at.is_(None),
            )
        ).all()
        if not rows:
            return 0
        versions = dict(
            session.execute(
                select(Device.id, Device.firmware_version).where(Device.id.in_({r.device_id for r in rows}))
            ).all()
        )
    # Publish before marking finalized: a crash in between repeats idempotent publishes, never skips them.
    messages: list[tuple[str, bytes]] = []
    for r in rows:
        messages.append(
            device_message(
                rollout_id=r.rollout_id,
                device_id=r.device_id,
                update_id=r.id,
                state=str(r.state),
                attempt=r.attempt,
                progress=r.progress,
                error=r.error_code,
                running_version=versions.get(r.device_id),
            )
        )
        if r.offered_at is not None:
            messages.append(clear_desired_message(r.device_id))
    rt.publisher.publish_many(messages)
    with rt.sessions() as session:
        done = session.execute(
            update(DeviceUpdate)
            .where(
                DeviceUpdate.id.in_([r.id for r in rows]),
                DeviceUpdate.finalized_at.is_(None),
                DeviceUpdate.state.in_(UPDATE_END_STATES),  # an operator's retry may have reopened it
            )
            .values(finalized_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        session.commit()
    follow_up(rt, rows)
    return int(done)


def follow_up(rt: Runtime, rows: Sequence[object]) -> None:
    """After updates ended: halt on too many failures, close emptied waves, refill free slots."""
    by_rollout: dict[int, set[int]] = defaultdict(set)
    failed: set[int] = set()
    for r in rows:
        rollout_id, wave_id, state = r.rollout_id, r.wave_id, r.state  # type: ignore[attr-defined]
        if wave_id is not None:
            by_rollout[rollout_id].add(wave_id)
        else:
            by_rollout.setdefault(rollout_id, set())
        if state in UPDATE_FAILURE_STATES:
            failed.add(rollout_id)
    for rollout_id, wave_ids in by_rollout.items():
        rt.marks.mark(rollout_id)
        if rollout_id in failed:
            halt_if_threshold_reached(rt, rollout_id)
        closed = False
        with rt.sessions() as session:
            open_waves = {w for w in wave_ids if wave_is_open(session, w)}
            status = session.scalar(select(Rollout.status).where(Rollout.id == rollout_id))
        for wave_id in sorted(wave_ids - open_waves):
            closed = close_wave(rt, wave_id) is not None or closed
        if status == RolloutState.RUNNING and not closed:
            admit(rt, rollout_id)
