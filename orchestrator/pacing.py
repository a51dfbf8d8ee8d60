"""How fast and when a rollout may act: its offer rate now, and when an install may be sent.

Both are computed from SQL and the clock on every call, never stored: the decision a restarted
worker reaches is the one the old worker would have reached.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.maintenance_windows import next_fit
from orchestrator.models import DeviceUpdate
from orchestrator.policy import RolloutPolicy
from orchestrator.state_machines import UpdateState

RATE_PERIOD = timedelta(minutes=1)


def rate_per_minute(
    session: Session, rollout_id: int, policy: RolloutPolicy, started_at: datetime | None, now: datetime
) -> int | None:
    """The offer rate the ramp allows now; None when the policy has no rate."""
    if policy.rate is None:
        return None
    succeeded = 0
    if policy.rate.every_succeeded is not None:
        succeeded = int(
            session.scalar(
                select(func.count()).where(
                    DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.state == UpdateState.SUCCEEDED
                )
            )
            or 0
        )
    running_for = (now - started_at).total_seconds() if started_at is not None else 0.0
    return policy.rate.per_minute(succeeded, running_for)


def offers_in_last_minute(session: Session, rollout_id: int, now: datetime) -> int:
    return int(
        session.scalar(
            select(func.count()).where(
                DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.offered_at > now - RATE_PERIOD
            )
        )
        or 0
    )


def rate_room(
    session: Session, rollout_id: int, policy: RolloutPolicy, started_at: datetime | None, now: datetime
) -> int | None:
    """Offers the rate allows right now (a sliding minute); None when unlimited by rate."""
    rate = rate_per_minute(session, rollout_id, policy, started_at, now)
    if rate is None:
        return None
    return max(0, rate - offers_in_last_minute(session, rollout_id, now))


def install_time(policy: RolloutPolicy, now: datetime) -> datetime | None:
    """When the install stage may be sent: ``now`` if a window is open with room for the install
    timeout (or the policy has no windows), else the start of the next window with room; None if
    none comes within the horizon."""
    return next_fit(policy.window_specs, now, timedelta(seconds=policy.install_timeout_s))


def pacing_view(
    session: Session,
    rollout_id: int,
    policy: RolloutPolicy,
    started_at: datetime | None,
    now: datetime,
) -> dict[str, object]:
    """What holds a rollout back now, for the portal and the API (JSON-ready; see ``schemas.Pacing``)."""
    from orchestrator.maintenance_windows import current_window, next_opening
    from orchestrator.models import Device

    view: dict[str, object] = {
        "rate_per_minute": rate_per_minute(session, rollout_id, policy, started_at, now),
        "offered_last_minute": offers_in_last_minute(session, rollout_id, now) if policy.rate else 0,
        "end_at": policy.end_at.isoformat() if policy.end_at else None,
        "continuous": policy.continuous,
        "waiting_offline": int(
            session.scalar(
                select(func.count())
                .select_from(DeviceUpdate)
                .join(Device, Device.id == DeviceUpdate.device_id)
                .where(
                    DeviceUpdate.rollout_id == rollout_id,
                    DeviceUpdate.state == UpdateState.QUEUED,
                    Device.online.is_(False),
                )
            )
            or 0
        ),
        "window_open": None,
        "waiting_for_window": 0,
        "soaking": int(
            session.scalar(
                select(func.count()).where(
                    DeviceUpdate.rollout_id == rollout_id, DeviceUpdate.state == UpdateState.SOAKING
                )
            )
            or 0
        )
        if policy.soak
        else 0,
    }
    if policy.windows:
        specs = policy.window_specs
        window = current_window(specs, now)
        upcoming = next_opening(specs, now)
        view["window_open"] = window is not None
        view["window_closes_at"] = window[1].isoformat() if window else None
        view["next_window_at"] = upcoming.isoformat() if upcoming else None
        view["waiting_for_window"] = int(
            session.scalar(
                select(func.count()).where(
                    DeviceUpdate.rollout_id == rollout_id,
                    DeviceUpdate.state == UpdateState.VERIFIED,
                    DeviceUpdate.redrive_at > now,
                )
            )
            or 0
        )
    return view
