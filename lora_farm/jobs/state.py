"""The job state machine: states, the transitions allowed between them, and the check.

``queued -> scheduled -> running -> uploading -> succeeded``, with ``failed``, ``cancelled`` and
``retrying`` (which always goes back to ``queued``). An illegal transition is a bug in the farm,
never a user error, so :func:`check_transition` raises :class:`IllegalTransition`.
"""

from __future__ import annotations

from enum import Enum

from lora_farm.errors import IllegalTransition


class JobState(str, Enum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    UPLOADING = "uploading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRYING = "retrying"

    def __str__(self) -> str:
        return self.value


S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.SCHEDULED, S.CANCELLED, S.FAILED}),
    # scheduled -> queued: the reaper takes a job back whose card's worker went away
    S.SCHEDULED: frozenset({S.RUNNING, S.QUEUED, S.CANCELLED, S.RETRYING}),
    S.RUNNING: frozenset({S.UPLOADING, S.FAILED, S.CANCELLED, S.RETRYING}),
    # uploading -> uploading: another upload attempt (storage was down)
    S.UPLOADING: frozenset({S.UPLOADING, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.RETRYING: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    # `lorafarm retry`: a finished job that did not succeed goes back to the queue
    S.FAILED: frozenset({S.QUEUED}),
    S.CANCELLED: frozenset({S.QUEUED}),
    S.SUCCEEDED: frozenset(),
}

TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
# terminal states the job ended in without shipping: their logs are archived as they are entered
ENDED_UNSHIPPED = frozenset({S.FAILED, S.CANCELLED})


def sources(target: JobState) -> frozenset[JobState]:
    """The states a job may move to ``target`` from (a state's move to itself left out)."""
    return frozenset(state for state, targets in TRANSITIONS.items()
                     if target in targets and state != target)
# states in which the job holds a VRAM reservation on a card
HOLDS_RESERVATION = frozenset({S.SCHEDULED, S.RUNNING})


def parse_state(value: str | JobState) -> JobState:
    try:
        return JobState(value)
    except ValueError:
        names = ", ".join(state.value for state in JobState)
        raise IllegalTransition(f"unknown job state {value!r}; the states are: {names}") from None


def can_transition(old: str | JobState, new: str | JobState) -> bool:
    return parse_state(new) in TRANSITIONS[parse_state(old)]


def check_transition(old: str | JobState, new: str | JobState, job_id: str = "?") -> JobState:
    """Return the new state, or raise ``IllegalTransition`` naming the job and both states."""
    old_state, new_state = parse_state(old), parse_state(new)
    if new_state not in TRANSITIONS[old_state]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old_state])) or "none (final)"
        raise IllegalTransition(
            f"job {job_id}: cannot go from `{old_state.value}` to `{new_state.value}`; "
            f"from `{old_state.value}` it may go to: {allowed}.")
    return new_state
