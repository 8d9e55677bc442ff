"""The job state machine: the happy path, the side exits, and illegal moves raising."""

import pytest

from lora_farm.errors import IllegalTransition
from lora_farm.jobs.state import TERMINAL, TRANSITIONS, JobState, can_transition, check_transition

S = JobState


def test_happy_path_is_allowed():
    path = [S.QUEUED, S.SCHEDULED, S.RUNNING, S.UPLOADING, S.SUCCEEDED]
    for old, new in zip(path, path[1:]):
        assert check_transition(old, new) == new


@pytest.mark.parametrize("old,new", [
    (S.RUNNING, S.RETRYING), (S.RETRYING, S.QUEUED), (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED), (S.QUEUED, S.CANCELLED), (S.UPLOADING, S.UPLOADING),
    (S.FAILED, S.QUEUED), (S.CANCELLED, S.QUEUED), (S.SCHEDULED, S.QUEUED)])
def test_side_exits_are_allowed(old, new):
    assert can_transition(old, new)


@pytest.mark.parametrize("old,new", [
    (S.QUEUED, S.RUNNING), (S.SUCCEEDED, S.QUEUED), (S.RUNNING, S.SUCCEEDED),
    (S.UPLOADING, S.RUNNING), (S.QUEUED, S.UPLOADING), (S.RETRYING, S.RUNNING)])
def test_illegal_moves_raise_and_name_both_states(old, new):
    with pytest.raises(IllegalTransition) as raised:
        check_transition(old, new, job_id="abc123")
    message = str(raised.value)
    assert "abc123" in message and f"`{old.value}`" in message and f"`{new.value}`" in message


def test_succeeded_is_final_and_every_state_has_rules():
    assert set(TRANSITIONS) == set(JobState)
    assert TRANSITIONS[S.SUCCEEDED] == frozenset()
    assert S.SUCCEEDED in TERMINAL and S.RUNNING not in TERMINAL


def test_unknown_state_names_the_valid_ones():
    with pytest.raises(IllegalTransition, match="queued, scheduled"):
        check_transition("paused", S.QUEUED)
