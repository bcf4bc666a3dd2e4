"""Idempotency keys: a client's key for a submission maps to the job it created, so a retried submission (a
dropped answer, a double click) returns that job instead of queueing a second one.

One small file per key, named by the key's sha256 and holding the job id (and, on a second line, the fingerprint
of the request that used it), written whole or not at all. The remote worker keeps its clients' keys this way
(HOME/worker-keys), and the REST API the `Idempotency-Key` header's (HOME/idempotency-keys). A key sent again with
another request is refused (KeyReused, 422) rather than answered with a job the client did not ask for.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

from kohya_backend.errors import TrainManagementError
from kohya_backend.fileio import atomic_write
from kohya_backend.jobs.store import JobNotFound, JobStore, validate_job_id

KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:._-")
MAX_KEY_CHARS = 200


class BadKey(TrainManagementError):
    """An idempotency key that is empty, too long or uses characters outside the safe set."""


class KeyReused(TrainManagementError):
    """An idempotency key sent again with another request than the one it was first used for."""

    http_status = 422


def check_key(key: object, what: str) -> str:
    """`key` when it is 1-200 characters of letters, digits, ':', '.', '_' or '-'; BadKey naming `what` else."""
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS or not set(key) <= KEY_CHARS:
        raise BadKey(
            f"{what} must be 1-{MAX_KEY_CHARS} characters of letters, digits, ':', '.', '_' or '-'",
            "send a random key per submission, e.g. a UUID, and the same key when you retry it",
        )
    return key


def fingerprint(request: object) -> str:
    """A request's fingerprint: the sha256 of its JSON form (keys sorted), the same for the same request sent
    again."""
    text = json.dumps(request, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _read(marker: Path) -> tuple[str, str | None]:
    """(job id, fingerprint or None) of a key's file; InvalidJobId (a JobNotFound) when it holds no job id."""
    first, _, rest = marker.read_text(encoding="utf-8").strip().partition("\n")
    return validate_job_id(first.strip()), rest.strip() or None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


class IdempotencyKeys:
    """The keys of one folder and the jobs they created. `lock` serialises check-then-queue per process: hold it
    from `known` until `remember`, so two retries racing each other queue one job."""

    def __init__(self, folder: Path, store: JobStore) -> None:
        self.folder = Path(folder)
        self.store = store
        self.lock = threading.Lock()

    def marker(self, key: str) -> Path:
        """The file that holds the job id of `key`."""
        return self.folder / hashlib.sha256(key.encode("utf-8")).hexdigest()

    def known(self, key: str, fingerprint: str | None = None) -> str | None:
        """The id of the job `key` created, if it was recorded and the job still exists; KeyReused when the key was
        recorded with a `fingerprint` other than this one (a key recorded without one matches any request)."""
        try:
            job_id, recorded = _read(self.marker(key))
            self.store.get(job_id)
        except (OSError, JobNotFound):
            return None
        if fingerprint is not None and recorded is not None and recorded != fingerprint:
            raise KeyReused(
                f"the Idempotency-Key {key!r} was used for another request, which queued job {job_id}",
                "send a new key with each new submission, and the same key only when you retry the same one",
            )
        return job_id

    def remember(self, key: str, job_id: str, fingerprint: str | None = None) -> None:
        """Record that `key` created `job_id` (for the request of `fingerprint`), whole or not at all (temporary
        file, fsync, rename): a half-written key reads as no key, and a retry would queue the job twice."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.marker(key), job_id if fingerprint is None else f"{job_id}\n{fingerprint}")

    def prune(self, cutoff: float) -> int:
        """Drop keys older than `cutoff` whose job was deleted (a resubmission then makes a new job, as it would
        anyway). A key written meanwhile or one the store cannot answer for (StoreError aborts) stays: its loss
        would turn a client's retry into a second job."""
        removed = 0
        for marker in self.folder.glob("*") if self.folder.is_dir() else []:
            if _mtime(marker) >= cutoff:
                continue
            try:
                self.store.get(_read(marker)[0])
            except OSError:  # gone meanwhile, or unreadable: not ours to judge
                continue
            except (
                JobNotFound
            ):  # the job is gone (InvalidJobId: the marker holds no id, e.g. a crashed write)
                marker.unlink(missing_ok=True)
                removed += 1
        return removed
