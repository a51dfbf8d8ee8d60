"""The three state machines of the domain as explicit transition tables.

Every status change in the system is looked up here (``next_state``); ``orchestrator.transitions``
is the only code that writes the result to the database.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from orchestrator.errors import IllegalTransition


# ================================================================ DeviceUpdate
class UpdateState(StrEnum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    OFFERED = "OFFERED"
    DOWNLOADING = "DOWNLOADING"
    DOWNLOADED = "DOWNLOADED"
    VERIFIED = "VERIFIED"
    INSTALLING = "INSTALLING"
    REBOOTING = "REBOOTING"
    SOAKING = "SOAKING"  # running the new version, reporting health until the soak ends
    ROLLING_BACK = "ROLLING_BACK"  # unhealthy in the soak: told to go back to its previous slot
    RETRYING = "RETRYING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    TIMED_OUT = "TIMED_OUT"
    SKIPPED = "SKIPPED"
    CANCELED = "CANCELED"


class UpdateEvent(StrEnum):
    # server side
    ENQUEUE = "enqueue"
    OFFER = "offer"
    CANCEL = "cancel"
    SKIP = "skip"
    REQUEUE = "requeue"  # RETRYING -> QUEUED with attempt + 1
    TIMEOUT = "timeout"  # no attempt left
    TIMEOUT_RETRY = "timeout_retry"  # attempts left
    RETRY_BY_OPERATOR = "retry_by_operator"  # FAILED/TIMED_OUT -> QUEUED with attempt + 1
    SOAK_PASSED = "soak_passed"  # healthy until the soak ended
    UNHEALTHY = "unhealthy"  # an unhealthy heartbeat, or none, during the soak
    # An AWS Jobs execution still QUEUED: the device has not started it (abort, halt)
    JOB_CANCELED = "job_canceled"
    # device reports
    REPORT_DOWNLOADING = "report_downloading"
    REPORT_DOWNLOADED = "report_downloaded"
    REPORT_VERIFIED = "report_verified"
    REPORT_INSTALLING = "report_installing"
    REPORT_REBOOTING = "report_rebooting"
    REPORT_SUCCEEDED = "report_succeeded"
    REPORT_SUCCEEDED_SOAK = "report_succeeded_soak"  # the policy asks for a soak first
    REPORT_FAILED = "report_failed"  # no attempt left
    REPORT_FAILED_RETRY = "report_failed_retry"  # attempts left
    REPORT_ROLLED_BACK = "report_rolled_back"
    REPORT_CANCELED = "report_canceled"  # the device dropped the update on an operator's stop request


U = UpdateState
E = UpdateEvent

UPDATE_END_STATES = frozenset({U.SUCCEEDED, U.FAILED, U.ROLLED_BACK, U.TIMED_OUT, U.SKIPPED, U.CANCELED})
# Once a device has been offered an update nothing on the server side may cancel it (one exception:
# an AWS Jobs execution the device has not started, JOB_CANCELED; see engine/waves.py).
UPDATE_IN_FLIGHT = (U.OFFERED, U.DOWNLOADING, U.DOWNLOADED, U.VERIFIED, U.INSTALLING, U.REBOOTING)
UPDATE_NOT_STARTED = frozenset({U.PENDING, U.QUEUED})
# Verified and past it: the install stage has been (or may now be) sent.
UPDATE_AWAITING_INSTALL = frozenset({U.VERIFIED, U.INSTALLING, U.REBOOTING})
# Offered but not installing: an operator may ask the device to stop (it drops the download).
UPDATE_STOPPABLE = (U.OFFERED, U.DOWNLOADING, U.DOWNLOADED, U.VERIFIED)
# Installed, not ended: no in-flight slot, but the wave waits and no other rollout takes the device.
UPDATE_SOAK = (U.SOAKING, U.ROLLING_BACK)
# Failure-like end states count against thresholds.
UPDATE_FAILURE_STATES = frozenset({U.FAILED, U.ROLLED_BACK, U.TIMED_OUT})

# Device reports may skip states (a lost or reordered message), so each in-flight state accepts every
# report that lies ahead of it; a report for the current or an earlier state is not a transition.
_PROGRESS_REPORTS: dict[UpdateEvent, UpdateState] = {
    E.REPORT_DOWNLOADING: U.DOWNLOADING,
    E.REPORT_DOWNLOADED: U.DOWNLOADED,
    E.REPORT_VERIFIED: U.VERIFIED,
    E.REPORT_INSTALLING: U.INSTALLING,
    E.REPORT_REBOOTING: U.REBOOTING,
    E.REPORT_SUCCEEDED: U.SUCCEEDED,
}
_ORDER = {state: index for index, state in enumerate((*UPDATE_IN_FLIGHT, U.SUCCEEDED))}

UPDATE_TRANSITIONS: dict[tuple[UpdateState, UpdateEvent], UpdateState] = {
    (U.PENDING, E.ENQUEUE): U.QUEUED,
    (U.PENDING, E.CANCEL): U.CANCELED,
    (U.PENDING, E.SKIP): U.SKIPPED,
    (U.QUEUED, E.OFFER): U.OFFERED,
    (U.QUEUED, E.CANCEL): U.CANCELED,
    (U.QUEUED, E.SKIP): U.SKIPPED,
    (U.RETRYING, E.REQUEUE): U.QUEUED,
    **{(s, E.TIMEOUT): U.TIMED_OUT for s in UPDATE_IN_FLIGHT},
    **{(s, E.TIMEOUT_RETRY): U.RETRYING for s in UPDATE_IN_FLIGHT},
    **{(s, E.REPORT_FAILED): U.FAILED for s in UPDATE_IN_FLIGHT},
    **{(s, E.REPORT_FAILED_RETRY): U.RETRYING for s in UPDATE_IN_FLIGHT},
    **{(s, E.REPORT_ROLLED_BACK): U.ROLLED_BACK for s in UPDATE_IN_FLIGHT},
    **{(s, E.REPORT_SUCCEEDED_SOAK): U.SOAKING for s in UPDATE_IN_FLIGHT},
    (U.SOAKING, E.SOAK_PASSED): U.SUCCEEDED,
    (U.SOAKING, E.UNHEALTHY): U.ROLLING_BACK,
    (U.OFFERED, E.JOB_CANCELED): U.CANCELED,
    (U.SOAKING, E.REPORT_ROLLED_BACK): U.ROLLED_BACK,
    (U.ROLLING_BACK, E.REPORT_ROLLED_BACK): U.ROLLED_BACK,
    (U.ROLLING_BACK, E.TIMEOUT): U.TIMED_OUT,
    # A stop request reaches a device that has not started installing: it drops the update.
    **{(s, E.REPORT_CANCELED): U.CANCELED for s in UPDATE_STOPPABLE},
    # The one way out of an end state: an operator starts a new attempt of a failed update.
    (U.FAILED, E.RETRY_BY_OPERATOR): U.QUEUED,
    (U.TIMED_OUT, E.RETRY_BY_OPERATOR): U.QUEUED,
    **{
        (s, event): target
        for s in UPDATE_IN_FLIGHT
        for event, target in _PROGRESS_REPORTS.items()
        if _ORDER[target] > _ORDER[s]
    },
}

REPORT_EVENTS: dict[str, tuple[UpdateEvent, UpdateEvent | None]] = {
    # report state -> (event when no attempt is left, event when attempts remain)
    "DOWNLOADING": (E.REPORT_DOWNLOADING, None),
    "DOWNLOADED": (E.REPORT_DOWNLOADED, None),
    "VERIFIED": (E.REPORT_VERIFIED, None),
    "INSTALLING": (E.REPORT_INSTALLING, None),
    "REBOOTING": (E.REPORT_REBOOTING, None),
    "SUCCEEDED": (E.REPORT_SUCCEEDED, None),
    "FAILED": (E.REPORT_FAILED, E.REPORT_FAILED_RETRY),
    "ROLLED_BACK": (E.REPORT_ROLLED_BACK, None),
    "CANCELED": (E.REPORT_CANCELED, None),
}


def report_event(report_state: str, attempts_left: bool) -> UpdateEvent:
    """The DeviceUpdate event for a device report; failures retry while attempts remain."""
    final, retry = REPORT_EVENTS[report_state]
    return retry if attempts_left and retry is not None else final


# ================================================================ Rollout
class RolloutState(StrEnum):
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    HALTED = "HALTED"
    ABORTED = "ABORTED"


class RolloutEvent(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    COMPLETE = "complete"
    HALT = "halt"
    ABORT = "abort"


R = RolloutState
RE = RolloutEvent

ROLLOUT_END_STATES = frozenset({R.COMPLETED, R.HALTED, R.ABORTED})

ROLLOUT_TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (R.SCHEDULED, RE.START): R.RUNNING,
    (R.SCHEDULED, RE.ABORT): R.ABORTED,
    (R.RUNNING, RE.PAUSE): R.PAUSED,
    (R.PAUSED, RE.RESUME): R.RUNNING,
    (R.RUNNING, RE.COMPLETE): R.COMPLETED,
    (R.RUNNING, RE.HALT): R.HALTED,
    (R.PAUSED, RE.HALT): R.HALTED,
    (R.RUNNING, RE.ABORT): R.ABORTED,
    (R.PAUSED, RE.ABORT): R.ABORTED,
}


# ================================================================ Wave
class WaveState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PASSED = "PASSED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class WaveEvent(StrEnum):
    START = "start"
    PASS = "pass"
    FAIL = "fail"
    CANCEL = "cancel"


W = WaveState
WE = WaveEvent

WAVE_END_STATES = frozenset({W.PASSED, W.FAILED, W.CANCELED})

WAVE_TRANSITIONS: dict[tuple[WaveState, WaveEvent], WaveState] = {
    (W.PENDING, WE.START): W.RUNNING,
    (W.PENDING, WE.CANCEL): W.CANCELED,
    (W.RUNNING, WE.PASS): W.PASSED,
    (W.RUNNING, WE.FAIL): W.FAILED,
}


# ================================================================ lookup
S = TypeVar("S", bound=StrEnum)
V = TypeVar("V", bound=StrEnum)


def next_state(
    table: dict[tuple[S, V], S], machine: str, state: S, event: V, *, entity_id: object = None
) -> S:
    """The state ``event`` leads to from ``state``; raises IllegalTransition when the table has none."""
    try:
        return table[(state, event)]
    except KeyError:
        raise IllegalTransition(machine, str(state), str(event), entity_id=entity_id) from None


def next_update_state(state: UpdateState, event: UpdateEvent, *, entity_id: object = None) -> UpdateState:
    return next_state(UPDATE_TRANSITIONS, "DeviceUpdate", state, event, entity_id=entity_id)


def next_rollout_state(state: RolloutState, event: RolloutEvent, *, entity_id: object = None) -> RolloutState:
    return next_state(ROLLOUT_TRANSITIONS, "Rollout", state, event, entity_id=entity_id)


def next_wave_state(state: WaveState, event: WaveEvent, *, entity_id: object = None) -> WaveState:
    return next_state(WAVE_TRANSITIONS, "Wave", state, event, entity_id=entity_id)
