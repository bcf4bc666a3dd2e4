"""Helpers shared by the job tests (scheduler and fault tests)."""

from __future__ import annotations

import tomlkit

from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import JobStore


def config_without_name(base: str, **changes: object) -> str:
    """The demo config with output_name removed (the scheduler writes it) and `changes` applied."""
    doc = tomlkit.parse(base)
    del doc["output_name"]
    for key, value in changes.items():
        doc[key] = value
    return tomlkit.dumps(doc)


def statuses(store: JobStore, job_id: str) -> list[JobStatus]:
    """Every status a job went through, in order."""
    return [t.to_status for t in store.transitions(job_id)]
