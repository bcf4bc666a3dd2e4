"""Content-addressed transfers to a worker: hash the job's input files (cached), send only what the worker lacks.

A file is known by its sha256 (remembered in models.hashing's cache, the trainer's too, so a checkpoint is hashed
once on this machine), so a checkpoint the worker already holds (from any earlier job) costs one query, and a
dataset sends only new or changed files. An upload goes in chunks at explicit offsets; when a connection
drops, the worker keeps what arrived and the next attempt continues from the offset it reports.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.worker_client import WorkerClient, WorkerRejected
from kohya_backend.jobs.worker_protocol import (
    FOLDER_KEYS,
    MAX_INPUT_FILES,
    InvalidName,
    validate_file_name,
    validate_relpath,
)
from kohya_backend.models.hashing import Sha256Cache

CHUNK_BYTES = 64 << 20
READ_BYTES = 1 << 20
QUERY_BATCH = 10_000
MAX_CONFLICTS = 20


class Cancelled(Exception):
    """The job was cancelled while its files were being sent."""


@dataclass(frozen=True)
class LocalFile:
    """One input file: where it is here, the relative path it gets on the worker, its sha256 and size."""

    path: Path
    rel: str
    sha256: str
    size: int


@dataclass(frozen=True)
class LocalInput:
    """A config key's input (a file, or a folder of files) as the worker's submission names it."""

    key: str
    name: str
    files: tuple[LocalFile, ...]

    def spec(self) -> dict[str, Any]:
        """The `inputs` entry of a worker submission."""
        return {
            "name": self.name,
            "files": [{"path": f.rel, "sha256": f.sha256, "size": f.size} for f in self.files],
        }

    @property
    def size(self) -> int:
        """Total bytes of its files."""
        return sum(f.size for f in self.files)


@dataclass
class TransferStats:
    """Bytes of one job's inputs: all of them, those already on the worker, those sent (with retries)."""

    worker: str
    total: int = 0
    done: int = 0
    sent: int = 0
    skipped: int = 0
    files: int = 0
    files_sent: int = 0
    by_key: dict[str, dict[str, int]] = field(default_factory=dict)

    def event(self) -> dict[str, Any]:
        """The fields of the `upload` event the scheduler shows as progress."""
        return {
            "worker": self.worker,
            "done": self.done,
            "total": self.total,
            "sent": self.sent,
            "skipped": self.skipped,
            "files": self.files,
        }


def _local_name(key: str, path: Path) -> str:
    try:
        return validate_file_name(path.name, what=f"{key} name")
    except InvalidName as exc:
        raise TrainManagementError(
            f"{path} cannot be sent to a worker: {exc.message}",
            "rename it using letters, digits, spaces and - _ . ( ) [ ] , + @ # & ' ! ~ =",
        ) from exc


def _folder_files(root: Path) -> Iterator[tuple[Path, str]]:
    """Regular files under `root` (symlinks to files followed), hidden files and folders skipped, sorted."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            if name.startswith(".") or not path.is_file():
                continue
            yield path, path.relative_to(root).as_posix()


def collect_input(key: str, path: Path, cache: Sha256Cache) -> LocalInput:
    """Hash the file or folder a config key names into a LocalInput (through the one sha256 cache, which the
    caller saves); refuses names a worker would refuse."""
    path = Path(path)
    name = _local_name(key, path)
    if key not in FOLDER_KEYS:
        if not path.is_file():
            raise TrainManagementError(f"{key} {path} is not a file", "check the job's config")
        return LocalInput(key, name, (LocalFile(path, name, cache.sha256(path), path.stat().st_size),))
    if not path.is_dir():
        raise TrainManagementError(f"{key} {path} is not a folder", "check the job's config")
    files = []
    for file, rel in _folder_files(path):
        try:
            validate_relpath(rel, what=f"{key} file")
        except InvalidName as exc:
            raise TrainManagementError(
                f"{file} cannot be sent to a worker: {exc.message}",
                "rename it using letters, digits, spaces and - _ . ( ) [ ] , + @ # & ' ! ~ =",
            ) from exc
        files.append(LocalFile(file, rel, cache.sha256(file), file.stat().st_size))
        if len(files) > MAX_INPUT_FILES:
            raise TrainManagementError(
                f"{key} {path} holds more than {MAX_INPUT_FILES} files", "split the dataset"
            )
    if not files:
        raise TrainManagementError(f"{key} {path} holds no files to send", "check the job's dataset")
    return LocalInput(key, name, tuple(files))


class Uploader:
    """Sends a job's missing blobs to one worker, resuming partial uploads, reporting progress as it goes."""

    def __init__(
        self,
        client: WorkerClient,
        stats: TransferStats,
        *,
        cancelled: Callable[[], bool] = lambda: False,
        progress: Callable[[TransferStats], None] = lambda s: None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.client = client
        self.stats = stats
        self.cancelled = cancelled
        self.progress = progress
        self.chunk_bytes = chunk_bytes

    def ensure(self, inputs: list[LocalInput]) -> None:
        """Make every input's blobs complete on the worker (one query per 10,000 files, then the uploads)."""
        unique: dict[str, LocalFile] = {}
        for item in inputs:
            for f in item.files:
                unique.setdefault(f.sha256, f)
        shas = list(unique)
        complete: set[str] = set()
        partial: dict[str, int] = {}
        for start in range(0, len(shas), QUERY_BATCH):
            answer = self.client.query_blobs(shas[start : start + QUERY_BATCH])
            complete.update(answer.get("complete") or [])
            partial.update({k: int(v) for k, v in (answer.get("partial") or {}).items()})
        stats = self.stats
        stats.total = sum(f.size for f in unique.values())
        stats.files = len(unique)
        stats.skipped = sum(unique[s].size for s in complete if s in unique)
        stats.done = stats.skipped
        self._account(inputs, complete)
        self.progress(stats)
        for sha, f in unique.items():
            if sha not in complete:
                self.upload(f, partial.get(sha, 0))
                stats.files_sent += 1
        self.progress(stats)

    def _account(self, inputs: list[LocalInput], complete: set[str]) -> None:
        for item in inputs:
            present = sum(f.size for f in item.files if f.sha256 in complete)
            self.stats.by_key[item.key] = {"bytes": item.size, "already_there": present}

    def upload(self, f: LocalFile, offset: int) -> None:
        """Send `f` from `offset` in chunks; a 409 (offset moved, another upload running) names where to go on."""
        base = self.stats.done
        conflicts = 0
        while True:
            length = min(self.chunk_bytes, f.size - offset)
            body = self._read(f, offset, length, base)
            try:
                answer = self.client.put_blob(f.sha256, offset, f.size, body, length)
            except WorkerRejected as exc:
                conflicts += 1
                held = exc.detail.get("offset")
                if exc.status != 409 or not isinstance(held, int) or conflicts > MAX_CONFLICTS:
                    raise
                time.sleep(min(0.2 * conflicts, 2.0))
                offset = held  # at the file's size, the next (empty) request is answered `complete`
                continue
            offset = int(answer["offset"])
            self.stats.done = base + offset
            if answer.get("complete"):
                break
        self.stats.done = base + f.size
        self.progress(self.stats)

    def _read(self, f: LocalFile, offset: int, length: int, base: int) -> Iterator[bytes]:
        """The bytes [offset, offset+length) of `f`, counted as sent; stops the request when cancelled."""
        with open(f.path, "rb") as handle:
            handle.seek(offset)
            left = length
            while left > 0:
                if self.cancelled():
                    raise Cancelled()
                block = handle.read(min(READ_BYTES, left))
                if not block:
                    raise TrainManagementError(
                        f"{f.path} got shorter while it was sent",
                        "do not change input files of a running job",
                    )
                left -= len(block)
                self.stats.sent += len(block)
                self.stats.done = base + offset + (length - left)
                self.progress(self.stats)
                yield block
