"""Copies of deleted jobs left on workers: deleting a job here deletes its copy on every worker that ran it.

The copies a job has are in its run.json (read before its folder goes). They are recorded in
HOME/worker-deletes.json and deleted from there: at once by the CLI, and by the pool's monitor whenever a worker
with pending deletes answers, so a worker that is offline now loses its copies when it is back. A copy still
running there is cancelled first and deleted on a later round.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.registry import WorkerEntry, WorkerRegistry
from kohya_backend.jobs.runner import read_json, write_json_atomic
from kohya_backend.jobs.store import validate_job_id
from kohya_backend.jobs.worker_client import WorkerClient, WorkerRejected, WorkerUnreachable
from kohya_backend.locks import file_lock

log = logging.getLogger(__name__)

PENDING_NAME = "worker-deletes.json"


def remote_copies(record: dict[str, Any] | None) -> dict[str, str]:
    """{worker name: remote job id} from a job's run.json (ids that are not job ids are left out)."""
    copies = {}
    for worker, remote in ((record or {}).get("remote") or {}).items():
        job_id = remote.get("job") if isinstance(remote, dict) else None
        try:
            copies[str(worker)] = validate_job_id(str(job_id))
        except TrainManagementError:
            continue
    return copies


class PendingDeletes:
    """HOME/worker-deletes.json: {worker name: [remote job ids]} still to delete on that worker."""

    def __init__(self, home_root: Path) -> None:
        self.path = Path(home_root) / PENDING_NAME
        self._lock = threading.Lock()

    def _read(self) -> dict[str, list[str]]:
        data = read_json(self.path) or {}
        return {str(k): [str(i) for i in v] for k, v in data.items() if isinstance(v, list) and v}

    def _write(self, data: dict[str, list[str]]) -> None:
        kept: dict[str, Any] = {k: v for k, v in data.items() if v}
        if not kept:
            self.path.unlink(missing_ok=True)
            return
        write_json_atomic(self.path, kept)

    def pending(self) -> dict[str, list[str]]:
        """What is still to delete, by worker."""
        return self._read() if self.path.exists() else {}

    def add(self, copies: dict[str, str]) -> None:
        """Record copies to delete (merged with what other processes recorded)."""
        with self._lock, file_lock(self.path):
            data = self._read()
            for worker, job_id in copies.items():
                if job_id not in data.setdefault(worker, []):
                    data[worker].append(job_id)
            self._write(data)

    def discard(self, copies: dict[str, str]) -> None:
        """Take recorded copies off again (their job was not deleted after all)."""
        with self._lock, file_lock(self.path):
            data = self._read()
            for worker, job_id in copies.items():
                data[worker] = [i for i in data.get(worker, []) if i != job_id]
            self._write(data)

    def flush(
        self,
        registry: WorkerRegistry,
        client_for: Callable[[WorkerEntry], WorkerClient],
        workers: Iterable[str] | None = None,
    ) -> dict[str, list[str]]:
        """Delete pending copies on `workers` (default: all with pending deletes) through the clients `client_for`
        gives (the pool's); returns what is left. No lock is held while a worker answers (a slow one would stall
        `add`, and so every job deletion): what was done is taken off the list as it then stands."""
        with self._lock, file_lock(self.path):
            todo = self._read()
        done: dict[str, set[str]] = {}
        for worker in list(todo if workers is None else set(workers) & set(todo)):
            left = _delete_on(registry, client_for, worker, todo[worker])
            done[worker] = set(todo[worker]) - set(left)
        with self._lock, file_lock(self.path):
            data = self._read()
            for worker, job_ids in done.items():
                data[worker] = [i for i in data.get(worker, []) if i not in job_ids]
            self._write(data)
            return {k: v for k, v in data.items() if v}


def _delete_on(
    registry: WorkerRegistry,
    client_for: Callable[[WorkerEntry], WorkerClient],
    worker: str,
    job_ids: list[str],
) -> list[str]:
    """Delete `job_ids` on `worker`; the ids left for a later round."""
    entry = registry.get(worker)
    if entry is None:
        log.warning("worker %s is not registered any more: its copies of %s stay there", worker, job_ids)
        return []
    client = client_for(entry)
    left: list[str] = []
    for index, job_id in enumerate(job_ids):
        try:
            client.delete_job(job_id)
        except WorkerUnreachable:  # offline (or slow: a delete that timed out finds nothing left next round)
            return left + job_ids[index:]  # every copy waits for the next round
        except WorkerRejected as exc:
            if exc.status != 409:  # nothing a retry would change
                log.warning("worker %s refused to delete job %s: %s", worker, job_id, exc.message)
                continue
            left.append(job_id)  # still running there: cancel it, delete it on a later round
            try:
                client.cancel(job_id)
            except TrainManagementError as cancel_error:
                log.info("job %s on worker %s: %s", job_id, worker, cancel_error.message)
        except TrainManagementError as exc:  # e.g. a refused token: keep it until that is fixed
            log.warning("deleting job %s on worker %s failed: %s", job_id, worker, exc.message)
            left.append(job_id)
    return left
