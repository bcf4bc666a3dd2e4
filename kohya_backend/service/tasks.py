"""Background tasks for work too long for a UI event (creating a dataset from a big upload, decoding every image
to validate it): a few daemon threads run them, and the caller gets a ticket to ask for the outcome later.

Daemon threads rather than concurrent.futures: an unfinished task must not hold up the host's exit.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kohya_backend.errors import TrainManagementError

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2
DEFAULT_KEEP = 64  # finished tasks remembered for their callers (older ones are forgotten first)


class UnknownTask(TrainManagementError):
    """No task has that ticket (never started here, or finished long ago and forgotten)."""

    http_status = 404


@dataclass(frozen=True)
class Task:
    """A task's state: `running`, `done` (with `result`) or `failed` (with `error`)."""

    ticket: str
    kind: str
    state: str = "running"
    result: Any = None
    error: TrainManagementError | None = None


class TaskRunner:
    """Runs submitted work on up to `workers` daemon threads, in order; `finished` counts the tasks that ended."""

    def __init__(self, workers: int = DEFAULT_WORKERS, keep: int = DEFAULT_KEEP) -> None:
        self.workers = workers
        self.keep = keep
        self.finished = 0
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._queue: queue.SimpleQueue[tuple[str, Callable[[], Any], Callable[[], None] | None]] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, kind: str, work: Callable[[], Any], *, cleanup: Callable[[], None] | None = None) -> str:
        """Queue `work` (then `cleanup`, whatever happened); returns the ticket to ask get() about it."""
        ticket = secrets.token_hex(8)
        with self._lock:
            self._tasks[ticket] = Task(ticket, kind)
            self._forget_old()
            if len(self._threads) < self.workers:
                thread = threading.Thread(target=self._serve, name=f"train-management-{kind}", daemon=True)
                self._threads.append(thread)
                thread.start()
        self._queue.put((ticket, work, cleanup))
        return ticket

    def get(self, ticket: str) -> Task:
        """The task of `ticket` as it is now; UnknownTask when there is none."""
        with self._lock:
            task = self._tasks.get(str(ticket))
        if task is None:
            raise UnknownTask(f"no task has the ticket {ticket!r}", "start the work again")
        return task

    def _forget_old(self) -> None:
        finished = [t for t, task in self._tasks.items() if task.state != "running"]
        for ticket in finished[: max(0, len(self._tasks) - self.keep)]:
            del self._tasks[ticket]

    def _serve(self) -> None:
        while True:
            ticket, work, cleanup = self._queue.get()
            with self._lock:
                kind = self._tasks[ticket].kind
            try:
                outcome = {"state": "done", "result": work()}
            except TrainManagementError as exc:
                outcome = {"state": "failed", "error": exc}
            except Exception as exc:  # a bug must not kill the thread: the caller sees what failed
                log.exception("Train Management: the %s task failed", kind)
                error = TrainManagementError(
                    f"{kind} failed: {type(exc).__name__}: {exc}", "see the host's log"
                )
                outcome = {"state": "failed", "error": error}
            if cleanup is not None:
                try:
                    cleanup()
                except Exception:  # e.g. a staging folder already gone: the task's outcome stands
                    log.exception("Train Management: cleaning up after the %s task failed", kind)
            with self._lock:
                self._tasks[ticket] = dataclasses.replace(self._tasks[ticket], **outcome)
                self.finished += 1
