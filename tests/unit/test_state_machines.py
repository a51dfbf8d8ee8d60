"""The transition tables: structure, and properties that no event sequence can break."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import IllegalTransition
from orchestrator.state_machines import (
    ROLLOUT_END_STATES,
    ROLLOUT_TRANSITIONS,
    UPDATE_END_STATES,
    UPDATE_IN_FLIGHT,
    UPDATE_TRANSITIONS,
    WAVE_END_STATES,
    WAVE_TRANSITIONS,
    RolloutEvent,
    RolloutState,
    UpdateEvent,
    UpdateState,
    WaveEvent,
    next_rollout_state,
    next_update_state,
    report_event,
)

# Progress rank within one attempt; RETRYING closes an attempt, REQUEUE opens the next one.
_RANK = {
    UpdateState.PENDING: 0,
    UpdateState.QUEUED: 1,
    **{s: 2 + i for i, s in enumerate(UPDATE_IN_FLIGHT)},
    UpdateState.SOAKING: 30,
    UpdateState.ROLLING_BACK: 31,
    UpdateState.RETRYING: 50,
    **{s: 100 for s in UPDATE_END_STATES},
}


def test_end_states_have_no_way_out_but_an_operators_retry_of_a_failure() -> None:
    for (state, event), _target in UPDATE_TRANSITIONS.items():
        if event == UpdateEvent.RETRY_BY_OPERATOR:
            assert state in (UpdateState.FAILED, UpdateState.TIMED_OUT)
            assert _target == UpdateState.QUEUED
            continue
        assert state not in UPDATE_END_STATES
    for (state, _event), _target in ROLLOUT_TRANSITIONS.items():
        assert state not in ROLLOUT_END_STATES
    for (state, _event), _target in WAVE_TRANSITIONS.items():
        assert state not in WAVE_END_STATES


def test_cancel_only_before_the_device_was_offered() -> None:
    sources = {state for (state, event) in UPDATE_TRANSITIONS if event == UpdateEvent.CANCEL}
    assert sources == {UpdateState.PENDING, UpdateState.QUEUED}
    for state in UPDATE_IN_FLIGHT:
        with pytest.raises(IllegalTransition):
            next_update_state(state, UpdateEvent.CANCEL)


def test_only_an_unstarted_aws_job_is_canceled_after_the_offer() -> None:
    sources = {state for (state, event) in UPDATE_TRANSITIONS if event == UpdateEvent.JOB_CANCELED}
    assert sources == {UpdateState.OFFERED}
    assert next_update_state(UpdateState.OFFERED, UpdateEvent.JOB_CANCELED) == UpdateState.CANCELED


def test_reports_may_skip_ahead_but_never_go_back() -> None:
    assert next_update_state(UpdateState.OFFERED, UpdateEvent.REPORT_VERIFIED) == UpdateState.VERIFIED
    assert next_update_state(UpdateState.DOWNLOADING, UpdateEvent.REPORT_SUCCEEDED) == UpdateState.SUCCEEDED
    with pytest.raises(IllegalTransition) as info:
        next_update_state(UpdateState.INSTALLING, UpdateEvent.REPORT_DOWNLOADING, entity_id=7)
    assert info.value.code == "illegal_transition"
    assert "7" in info.value.message


def test_failures_retry_only_while_attempts_remain() -> None:
    assert report_event("FAILED", attempts_left=True) == UpdateEvent.REPORT_FAILED_RETRY
    assert report_event("FAILED", attempts_left=False) == UpdateEvent.REPORT_FAILED
    assert report_event("ROLLED_BACK", attempts_left=True) == UpdateEvent.REPORT_ROLLED_BACK
    assert next_update_state(UpdateState.RETRYING, UpdateEvent.REQUEUE) == UpdateState.QUEUED


def test_a_soak_ends_in_success_or_a_rollback_and_never_goes_back_to_installing() -> None:
    soaking = next_update_state(UpdateState.REBOOTING, UpdateEvent.REPORT_SUCCEEDED_SOAK)
    assert soaking == UpdateState.SOAKING
    assert next_update_state(soaking, UpdateEvent.SOAK_PASSED) == UpdateState.SUCCEEDED
    rolling_back = next_update_state(soaking, UpdateEvent.UNHEALTHY)
    assert next_update_state(rolling_back, UpdateEvent.REPORT_ROLLED_BACK) == UpdateState.ROLLED_BACK
    assert next_update_state(rolling_back, UpdateEvent.TIMEOUT) == UpdateState.TIMED_OUT
    for event in (UpdateEvent.REPORT_INSTALLING, UpdateEvent.CANCEL, UpdateEvent.TIMEOUT_RETRY):
        with pytest.raises(IllegalTransition):
            next_update_state(soaking, event)


def test_rollout_machine() -> None:
    assert next_rollout_state(RolloutState.SCHEDULED, RolloutEvent.START) == RolloutState.RUNNING
    assert next_rollout_state(RolloutState.RUNNING, RolloutEvent.PAUSE) == RolloutState.PAUSED
    assert next_rollout_state(RolloutState.PAUSED, RolloutEvent.RESUME) == RolloutState.RUNNING
    with pytest.raises(IllegalTransition):
        next_rollout_state(RolloutState.COMPLETED, RolloutEvent.RESUME)
    with pytest.raises(IllegalTransition):
        next_rollout_state(RolloutState.PAUSED, RolloutEvent.COMPLETE)


def test_wave_machine_is_total_over_its_declared_events() -> None:
    assert {event for (_s, event) in WAVE_TRANSITIONS} == set(WaveEvent)


# The machine's own events; an operator's retry (a new attempt after an end state) is tested apart.
_MACHINE_EVENTS = [e for e in UpdateEvent if e != UpdateEvent.RETRY_BY_OPERATOR]


@given(st.lists(st.sampled_from(_MACHINE_EVENTS), max_size=60))
def test_no_event_sequence_breaks_the_update_machine(events: list[UpdateEvent]) -> None:
    state, attempt = UpdateState.PENDING, 1
    ended_in: UpdateState | None = None
    for event in events:
        try:
            new = next_update_state(state, event)
        except IllegalTransition:
            continue
        new_attempt = attempt + 1 if event == UpdateEvent.REQUEUE else attempt
        # strictly forward: (attempt, rank) only grows
        assert (new_attempt, _RANK[new]) > (attempt, _RANK[state]) or (
            new == state == UpdateState.DOWNLOADING
        ), (state, event, new)
        assert ended_in is None, f"left end state {ended_in} via {event}"
        if new in UPDATE_END_STATES:
            ended_in = new
        state, attempt = new, new_attempt
    if ended_in is not None:
        assert state == ended_in  # exactly one end state, never left


@given(st.lists(st.sampled_from(list(RolloutEvent)), max_size=30))
def test_no_event_sequence_leaves_a_rollout_end_state(events: list[RolloutEvent]) -> None:
    state = RolloutState.SCHEDULED
    for event in events:
        try:
            new = next_rollout_state(state, event)
        except IllegalTransition:
            continue
        assert state not in ROLLOUT_END_STATES
        state = new
