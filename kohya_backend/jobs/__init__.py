"""Training jobs: the one state machine of job statuses and the persistent SQLite job store."""

from kohya_backend.jobs.states import (
    ALLOWED_TRANSITIONS,
    INITIAL_STATUS,
    InvalidTransition,
    JobStatus,
    check_transition,
)
from kohya_backend.jobs.store import (
    SCHEMA_VERSION,
    InvalidJobId,
    Job,
    JobActive,
    JobNotFound,
    JobStore,
    StoreError,
    Transition,
    validate_job_id,
)

__all__ = [
    "ALLOWED_TRANSITIONS",
    "INITIAL_STATUS",
    "SCHEMA_VERSION",
    "InvalidJobId",
    "InvalidTransition",
    "Job",
    "JobActive",
    "JobNotFound",
    "JobStatus",
    "JobStore",
    "StoreError",
    "Transition",
    "check_transition",
    "validate_job_id",
]
