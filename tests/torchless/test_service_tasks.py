"""Background tasks (dataset creation and validation from the tab): tickets, outcomes, errors, cleanup, memory."""

from __future__ import annotations

import threading
import time

import pytest

from kohya_backend.errors import DatasetError, TrainManagementError
from kohya_backend.service.tasks import Task, TaskRunner, UnknownTask


def _ended(runner: TaskRunner, ticket: str) -> Task:
    deadline = time.monotonic() + 10
    while (task := runner.get(ticket)).state == "running":
        assert time.monotonic() < deadline, "the task did not end"
        time.sleep(0.01)
    return task


def test_a_task_runs_in_the_background_and_its_ticket_gives_the_outcome() -> None:
    runner = TaskRunner(workers=1)
    gate = threading.Event()
    cleaned: list[str] = []
    ticket = runner.submit("slow", lambda: gate.wait(5) and 42, cleanup=lambda: cleaned.append("slow"))
    queued = runner.submit("next", lambda: "second")
    assert runner.get(ticket).state == "running" and runner.get(queued).state == "running"
    assert runner.finished == 0 and cleaned == []
    gate.set()
    assert _ended(runner, ticket) == Task(ticket, "slow", state="done", result=42)
    assert _ended(runner, queued).result == "second" and runner.finished == 2 and cleaned == ["slow"]


def test_failures_are_the_outcome_and_cleanup_still_runs() -> None:
    runner = TaskRunner()
    cleaned: list[int] = []

    def refused() -> None:
        raise DatasetError("no usable image", "upload images", files=["a.pdf"])

    def broken() -> None:
        raise KeyError("bug")

    first = _ended(runner, runner.submit("dataset creation", refused, cleanup=lambda: cleaned.append(1)))
    assert (
        first.state == "failed" and isinstance(first.error, DatasetError) and first.error.files == ["a.pdf"]
    )
    second = _ended(runner, runner.submit("dataset validation", broken, cleanup=lambda: cleaned.append(2)))
    assert isinstance(second.error, TrainManagementError)
    assert str(second.error.message) == "dataset validation failed: KeyError: 'bug'"
    assert sorted(cleaned) == [1, 2]
    assert _ended(runner, runner.submit("after", lambda: "ok")).result == "ok"  # the threads live on


def test_unknown_tickets_and_only_finished_tasks_are_forgotten() -> None:
    runner = TaskRunner(workers=1, keep=2)
    with pytest.raises(UnknownTask, match="no task has the ticket") as caught:
        runner.get("nope")
    assert caught.value.http_status == 404
    gate = threading.Event()
    waiting = runner.submit("waiting", lambda: gate.wait(30))
    queued = [runner.submit("quick", lambda: None) for _ in range(3)]
    assert all(runner.get(t).state == "running" for t in [waiting, *queued])  # over `keep`, none forgotten
    gate.set()
    _ended(runner, queued[-1])
    latest = runner.submit("latest", lambda: None)  # beyond `keep`: the oldest finished ones are forgotten
    for ticket in (waiting, queued[0], queued[1]):
        with pytest.raises(UnknownTask):
            runner.get(ticket)
    assert runner.get(queued[2]).state == "done" and _ended(runner, latest).state == "done"
