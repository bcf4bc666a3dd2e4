"""The job state machine: its one transition table, checks and error messages."""

from __future__ import annotations

import json
from collections import deque

import pytest

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs import (
    ALLOWED_TRANSITIONS,
    INITIAL_STATUS,
    InvalidTransition,
    JobStatus,
    check_transition,
)

S = JobStatus
ALLOWED_PAIRS = [(old, new) for old, targets in ALLOWED_TRANSITIONS.items() for new in sorted(targets)]
FORBIDDEN_PAIRS = [(old, new) for old in S for new in S if new not in ALLOWED_TRANSITIONS[old]]


def _reachable(start: JobStatus) -> set[JobStatus]:
    seen = {start}
    todo = deque([start])
    while todo:
        for nxt in ALLOWED_TRANSITIONS[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_values_are_lowercase_names_and_serialise_as_strings() -> None:
    for status in S:
        assert status.value == status.name.lower()
        assert str(status) == status.value
        assert S(status.value) is status
    assert json.dumps({"s": S.TRAINING}) == '{"s": "training"}'


def test_terminal_resumable_and_active_sets() -> None:
    assert S.terminal() == {S.COMPLETED, S.FAILED, S.CANCELLED}
    assert S.resumable() == {S.INTERRUPTED, S.FAILED, S.CANCELLED}
    assert S.active() == {S.PREPARING, S.TRAINING, S.SAVING, S.CANCELLING}
    assert S.COMPLETED.is_terminal and not S.COMPLETED.is_resumable
    assert S.INTERRUPTED.is_resumable and not S.INTERRUPTED.is_terminal
    assert not S.QUEUED.is_terminal and not S.TRAINING.is_resumable


def test_table_covers_every_status_and_has_no_self_loops() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(S)
    for old, targets in ALLOWED_TRANSITIONS.items():
        assert old not in targets
    assert ALLOWED_TRANSITIONS[S.COMPLETED] == frozenset()
    for status in S.resumable():
        assert ALLOWED_TRANSITIONS[status] == {S.QUEUED}


def test_table_matches_the_design() -> None:
    assert ALLOWED_TRANSITIONS[S.QUEUED] == {S.PREPARING, S.CANCELLING, S.CANCELLED, S.FAILED}
    assert ALLOWED_TRANSITIONS[S.PREPARING] == {S.TRAINING, S.FAILED, S.CANCELLING, S.INTERRUPTED}
    assert ALLOWED_TRANSITIONS[S.TRAINING] == {S.SAVING, S.FAILED, S.CANCELLING, S.INTERRUPTED}
    assert ALLOWED_TRANSITIONS[S.SAVING] == {S.COMPLETED, S.TRAINING, S.FAILED, S.CANCELLING, S.INTERRUPTED}
    assert ALLOWED_TRANSITIONS[S.CANCELLING] == {S.CANCELLED, S.COMPLETED, S.FAILED, S.INTERRUPTED}


def test_every_state_is_reachable_from_submission() -> None:
    assert INITIAL_STATUS is S.QUEUED
    assert _reachable(INITIAL_STATUS) == set(S)


def test_every_state_can_still_end_completed() -> None:
    for status in S:
        assert S.COMPLETED in _reachable(status), status


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        ALLOWED_TRANSITIONS[S.COMPLETED] = frozenset({S.QUEUED})  # type: ignore[index]


@pytest.mark.parametrize(("old", "new"), ALLOWED_PAIRS, ids=lambda s: s.value)
def test_allowed_transition_passes(old: JobStatus, new: JobStatus) -> None:
    check_transition("20261125-153012-ab12cd", old, new)


@pytest.mark.parametrize(("old", "new"), FORBIDDEN_PAIRS, ids=lambda s: s.value)
def test_forbidden_transition_raises_with_job_from_to_and_allowed(old: JobStatus, new: JobStatus) -> None:
    with pytest.raises(InvalidTransition) as info:
        check_transition("20261125-153012-ab12cd", old, new)
    err = info.value
    assert isinstance(err, TrainManagementError)
    assert (err.job_id, err.current, err.new) == ("20261125-153012-ab12cd", old, new)
    assert err.allowed == ALLOWED_TRANSITIONS[old]
    text = str(err)
    assert "20261125-153012-ab12cd" in text and f"'{old.value}'" in text and f"'{new.value}'" in text
    for target in ALLOWED_TRANSITIONS[old]:
        assert target.value in text
    assert err.hint


def test_allowed_and_forbidden_pairs_partition_all_pairs() -> None:
    # The table is small; every pair outside it is checked above, which includes these classics.
    assert (S.COMPLETED, S.QUEUED) in FORBIDDEN_PAIRS
    assert (S.QUEUED, S.TRAINING) in FORBIDDEN_PAIRS
    assert (S.CANCELLED, S.TRAINING) in FORBIDDEN_PAIRS
    assert len(FORBIDDEN_PAIRS) + len(ALLOWED_PAIRS) == len(S) ** 2


def test_completed_hint_says_submit_again_and_failed_says_resume() -> None:
    with pytest.raises(InvalidTransition, match="submit a new job"):
        check_transition("20261125-153012-ab12cd", S.COMPLETED, S.QUEUED)
    with pytest.raises(InvalidTransition, match="resume"):
        check_transition("20261125-153012-ab12cd", S.FAILED, S.TRAINING)


def test_expect_mismatch_fails_even_when_the_edge_exists() -> None:
    check_transition("20261125-153012-ab12cd", S.QUEUED, S.PREPARING, frozenset({S.QUEUED}))
    with pytest.raises(InvalidTransition, match="expected one of: queued") as info:
        check_transition("20261125-153012-ab12cd", S.PREPARING, S.FAILED, frozenset({S.QUEUED}))
    assert info.value.expected == {S.QUEUED}
    assert "another request changed the job first" in str(info.value)
