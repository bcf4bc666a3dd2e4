"""Job states and the one table of allowed transitions between them (STYLE.md item 10)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType

from kohya_backend.errors import TrainManagementError


class JobStatus(str, Enum):
    """Where a training job is in its life; the value is what the database and the API store."""

    QUEUED = "queued"
    PREPARING = "preparing"
    TRAINING = "training"
    SAVING = "saving"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def terminal(cls) -> frozenset[JobStatus]:
        """States in which no process works on the job any more and none will start by itself."""
        return _TERMINAL

    @classmethod
    def resumable(cls) -> frozenset[JobStatus]:
        """States from which a user may resume a job (it goes back to `queued`)."""
        return _RESUMABLE

    @classmethod
    def active(cls) -> frozenset[JobStatus]:
        """States in which a process runs, or is about to run, for the job."""
        return _ACTIVE

    @classmethod
    def busy(cls) -> frozenset[JobStatus]:
        """Queued or active: a job that holds its inputs (its dataset may not change under it)."""
        return _BUSY

    @property
    def is_terminal(self) -> bool:
        """True for completed, failed and cancelled."""
        return self in _TERMINAL

    @property
    def is_resumable(self) -> bool:
        """True for interrupted, failed and cancelled."""
        return self in _RESUMABLE


_S = JobStatus
_TERMINAL = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})
_RESUMABLE = frozenset({_S.INTERRUPTED, _S.FAILED, _S.CANCELLED})
_ACTIVE = frozenset({_S.PREPARING, _S.TRAINING, _S.SAVING, _S.CANCELLING})
_BUSY = frozenset({_S.QUEUED, *_ACTIVE})

INITIAL_STATUS = JobStatus.QUEUED

# Why each edge exists:
# - failed / interrupted may come from any running state: the trainer reports an error, or the
#   scheduler finds its process (or the remote worker) gone.
# - a queued job has no process yet, so it can be cancelled outright, or go through `cancelling`
#   when a runner has already picked it up; it fails when its inputs vanish before it starts.
# - saving -> training: a per-epoch save finished and training goes on.
# - cancelling -> completed: the stop request arrived after the last save had finished and the
#   process exited cleanly; the LoRA is in the Lora folder, so calling the job cancelled would lie.
# - resumable states go back to queued (resume); completed is final.
ALLOWED_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = MappingProxyType(
    {
        _S.QUEUED: frozenset({_S.PREPARING, _S.CANCELLING, _S.CANCELLED, _S.FAILED}),
        _S.PREPARING: frozenset({_S.TRAINING, _S.FAILED, _S.CANCELLING, _S.INTERRUPTED}),
        _S.TRAINING: frozenset({_S.SAVING, _S.FAILED, _S.CANCELLING, _S.INTERRUPTED}),
        _S.SAVING: frozenset({_S.COMPLETED, _S.TRAINING, _S.FAILED, _S.CANCELLING, _S.INTERRUPTED}),
        _S.CANCELLING: frozenset({_S.CANCELLED, _S.COMPLETED, _S.FAILED, _S.INTERRUPTED}),
        _S.COMPLETED: frozenset(),
        _S.FAILED: frozenset({_S.QUEUED}),
        _S.CANCELLED: frozenset({_S.QUEUED}),
        _S.INTERRUPTED: frozenset({_S.QUEUED}),
    }
)


def _names(statuses: frozenset[JobStatus]) -> str:
    return ", ".join(sorted(s.value for s in statuses)) or "none"


class InvalidTransition(TrainManagementError):
    """A status change the state machine forbids, or one whose expected current state no longer holds."""

    http_status = 409

    def __init__(
        self,
        job_id: str,
        current: JobStatus,
        new: JobStatus,
        allowed: frozenset[JobStatus],
        expected: frozenset[JobStatus] | None = None,
    ) -> None:
        self.job_id = job_id
        self.current = current
        self.new = new
        self.allowed = allowed
        self.expected = expected
        if expected is not None and current not in expected:
            message = (
                f"job {job_id}: cannot move to '{new}': it is '{current}', "
                f"but the caller expected one of: {_names(expected)}"
            )
            hint = "another request changed the job first; reload it and decide again"
        else:
            message = (
                f"job {job_id}: cannot move from '{current}' to '{new}'; "
                f"allowed from '{current}': {_names(allowed)}"
            )
            hint = _hint(current)
        super().__init__(message, hint)


def _hint(current: JobStatus) -> str:
    if current is JobStatus.COMPLETED:
        return "a completed job is final; submit a new job to train again"
    if current.is_resumable:
        return "resume the job first (it goes back to 'queued')"
    return "wait for the job to reach one of the allowed states"


def check_transition(
    job_id: str,
    current: JobStatus,
    new: JobStatus,
    expect: frozenset[JobStatus] | None = None,
) -> None:
    """Raise InvalidTransition unless `current -> new` is in ALLOWED_TRANSITIONS (and current is in `expect`)."""
    allowed = ALLOWED_TRANSITIONS[current]
    if (expect is not None and current not in expect) or new not in allowed:
        raise InvalidTransition(job_id, current, new, allowed, expect)
