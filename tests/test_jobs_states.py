"""The job state machine: the shape of its one transition table (every state reachable, every state can still
end completed), its error messages, and property tests of the store's transitions: any sequence of requested
changes, applied to a real JobStore, keeps exactly the allowed ones, records each, and leaves a refused one without
a trace."""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from collections import deque
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs import (
    ALLOWED_TRANSITIONS,
    INITIAL_STATUS,
    InvalidTransition,
    JobStatus,
    check_transition,
)
from kohya_backend.jobs.store import JobStore

S = JobStatus


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


def test_every_state_is_reachable_from_submission() -> None:
    assert INITIAL_STATUS is S.QUEUED
    assert _reachable(INITIAL_STATUS) == set(S)


def test_every_state_can_still_end_completed() -> None:
    for status in S:
        assert S.COMPLETED in _reachable(status), status


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        ALLOWED_TRANSITIONS[S.COMPLETED] = frozenset({S.QUEUED})  # type: ignore[index]


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


def test_forbidden_transition_names_the_job_both_states_and_what_is_allowed() -> None:
    with pytest.raises(InvalidTransition) as info:
        check_transition("20261125-153012-ab12cd", S.QUEUED, S.TRAINING)
    err = info.value
    assert isinstance(err, TrainManagementError) and err.http_status == 409
    assert (err.job_id, err.current, err.new, err.allowed) == (
        "20261125-153012-ab12cd",
        S.QUEUED,
        S.TRAINING,
        ALLOWED_TRANSITIONS[S.QUEUED],
    )
    assert "'queued'" in str(err) and "'training'" in str(err) and "cancelling, failed, preparing" in str(err)


class StoreTransitions(RuleBasedStateMachine):
    """Random status requests against a real JobStore, checked against the table after every step."""

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="tm-states-"))
        self.store = JobStore(self.folder)
        self.status: dict[str, JobStatus] = {}
        self.moves: dict[str, int] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @rule(target=jobs)
    def submit(self) -> str:
        job = self.store.create(
            fm_type="sd_1_5",
            model="m.safetensors",
            dataset="d",
            instance_type="local",
            output_name=f"lora-{len(self.status)}",
            config_toml="",
            params={},
        )
        assert job.status is INITIAL_STATUS
        self.status[job.id], self.moves[job.id] = INITIAL_STATUS, 0
        return job.id

    @rule(
        job_id=jobs,
        new=st.sampled_from(list(S)),
        expect=st.none() | st.frozensets(st.sampled_from(list(S)), min_size=1),
        reason=st.text(min_size=1, max_size=20),
    )
    def request(self, job_id: str, new: JobStatus, expect: frozenset[JobStatus] | None, reason: str) -> None:
        current = self.status[job_id]
        before = self.store.get(job_id)
        allowed = new in ALLOWED_TRANSITIONS[current] and (expect is None or current in expect)
        if allowed:
            job = self.store.transition(job_id, new, reason, expect=expect)
            assert (job.status, job.reason) == (new, reason) and job.updated_at >= before.updated_at
            if new is S.QUEUED:  # resumed: the previous run's process is forgotten
                assert job.pid is None and job.pgid is None
            self.status[job_id] = new
            self.moves[job_id] += 1
        else:
            with pytest.raises(InvalidTransition) as info:
                self.store.transition(job_id, new, reason, expect=expect)
            assert (info.value.current, info.value.new) == (current, new)
            after = self.store.get(job_id)
            assert (after.status, after.reason, after.updated_at) == (
                before.status,
                before.reason,
                before.updated_at,
            )

    @rule(job_id=jobs, pid=st.integers(min_value=2, max_value=2**22))
    def start_process(self, job_id: str, pid: int) -> None:
        self.store.set_process(job_id, pid, pid)

    @invariant()
    def history_is_a_chain_of_allowed_moves_ending_in_the_status(self) -> None:
        for job_id, status in self.status.items():
            history = self.store.transitions(job_id)
            assert len(history) == 1 + self.moves[job_id]
            assert (history[0].from_status, history[0].to_status) == (None, INITIAL_STATUS)
            for earlier, later in itertools.pairwise(history):
                assert later.from_status is earlier.to_status
                assert later.to_status in ALLOWED_TRANSITIONS[earlier.to_status]
                assert later.at >= earlier.at
            assert history[-1].to_status is self.store.get(job_id).status is status


TestStoreTransitions = StoreTransitions.TestCase
TestStoreTransitions.settings = settings(max_examples=20, stateful_step_count=20, deadline=None)
