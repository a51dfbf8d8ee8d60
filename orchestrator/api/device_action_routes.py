"""Per-device actions inside a rollout: retry a failed update, cancel one not offered yet, ask one
offered but not installing to stop. Each answers with the device's update as it is now."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from orchestrator.api.deps import DbSession, Operator, actor
from orchestrator.api.schemas import DeviceUpdateOut, errors
from orchestrator.engine.client import nudge, send_stage
from orchestrator.models import DeviceUpdate, Wave
from orchestrator.protocol import DEVICE_ID_PATTERN
from orchestrator.services import device_actions

router = APIRouter(prefix="/rollouts", tags=["device actions"], responses=errors(401, 403, 404, 409, 422))
RolloutId = Annotated[int, Path(ge=1, le=2**31 - 1, description="rollout id")]
DevicePath = Annotated[str, Path(pattern=DEVICE_ID_PATTERN, description="device id")]


def _out(session: DbSession, row: DeviceUpdate) -> DeviceUpdateOut:
    wave = session.get(Wave, row.wave_id) if row.wave_id is not None else None
    return DeviceUpdateOut(
        id=row.id,
        device_id=row.device_id,
        wave_index=wave.index if wave is not None else None,
        state=str(row.state),
        attempt=row.attempt,
        progress=row.progress,
        error_code=row.error_code,
        offered_at=row.offered_at,
        finished_at=row.finished_at,
        updated_at=row.updated_at,
        stop_requested_at=row.stop_requested_at,
    )


@router.post("/{rollout_id}/devices/{device_id}/retry", response_model=DeviceUpdateOut)
def retry_device(
    rollout_id: RolloutId, device_id: DevicePath, session: DbSession, token: Operator
) -> DeviceUpdateOut:
    """A FAILED or TIMED_OUT update gets a new attempt in the same rollout, offered as the policy
    allows. 409 for other states, install-step failures (never installed twice) or a rollout that
    is not running or paused."""
    row = device_actions.retry_update(session, rollout_id, device_id, actor=actor(token))
    nudge(rollout_id)
    return _out(session, row)


@router.post("/{rollout_id}/devices/{device_id}/cancel", response_model=DeviceUpdateOut)
def cancel_device(
    rollout_id: RolloutId, device_id: DevicePath, session: DbSession, token: Operator
) -> DeviceUpdateOut:
    """An update not offered yet (PENDING or QUEUED) is CANCELED; 409 once it was offered."""
    row = device_actions.cancel_update(session, rollout_id, device_id, actor=actor(token))
    nudge(rollout_id)  # its wave may have nothing open any more
    return _out(session, row)


@router.post("/{rollout_id}/devices/{device_id}/stop", response_model=DeviceUpdateOut, status_code=202)
def stop_device(
    rollout_id: RolloutId, device_id: DevicePath, session: DbSession, token: Operator
) -> DeviceUpdateOut:
    """Ask a device offered the update, and not installing it, to drop it: it ends CANCELED when the
    device confirms (202: requested). 409 when it is installing (never interrupted) or not offered."""
    row = device_actions.request_stop(session, rollout_id, device_id, actor=actor(token))
    send_stage([row.id])
    return _out(session, row)
