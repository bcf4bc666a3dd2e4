"""Reclaiming a worker's disk: which blobs its jobs still use, DELETE of one blob, and `worker gc`.

A job's inputs are hard links to blobs (models/by-sha256/<sha256>/<name>, datasets/<name>-<digest>/...,
models/<name>-<digest>/...), so a blob's bytes come back only once its materialised links go too. Jobs that may
still train (queued, running, or resumable: interrupted, failed, cancelled) keep every blob and materialised input
they link; completed and deleted jobs keep nothing, though a recent use keeps them for the grace period. Uploads in
progress belong to the worker process (gc may run beside it), so anything touched in the last minutes stays.
Both hold HOME/materialise.lock from their job scan to the removal, as a submission does from materialising its
inputs to queueing its job, so an input reused meanwhile never goes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from kohya_backend.errors import InUse, TrainManagementError
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job, JobStore
from kohya_backend.jobs.worker_protocol import INPUT_KEYS, SHA256_PATTERN, validate_sha256
from kohya_backend.service.blobs import BLOBS_DIR, BlobError, BlobStore
from kohya_backend.service.home import Home
from kohya_backend.service.idempotency import IdempotencyKeys
from kohya_backend.service.worker_jobs import BY_SHA256, KEYS_DIR, MATERIALISED_FOLDER, materialise_lock

MIN_AGE_S = 600.0  # never touch what changed in the last 10 minutes: a live worker may be using it right now

Inode = tuple[int, int]


class BlobInUse(InUse, BlobError):
    """Jobs that may still train link this blob; `job_ids` names them."""


class BlobNotFound(BlobError):
    """The worker holds no such blob (complete or partial)."""

    http_status = 404


def _protecting() -> frozenset[JobStatus]:
    return JobStatus.busy() | JobStatus.resumable()


def materialised_entries(home: Home) -> list[Path]:
    """Every materialised input on disk: models/by-sha256/<sha256>, models/<name>-<digest>, datasets/<...>."""
    found: list[Path] = []
    by_sha = home.models / BY_SHA256
    if by_sha.is_dir():
        found += [p for p in by_sha.iterdir() if p.is_dir() and SHA256_PATTERN.fullmatch(p.name)]
    for root in (home.models, home.datasets):
        found += [p for p in root.iterdir() if p.is_dir() and MATERIALISED_FOLDER.fullmatch(p.name)]
    return found


def _entry_of(path: Path, home: Home) -> Path | None:
    """The materialised entry holding `path` (a job's input), or None when it is not one."""
    for root, pattern in ((home.models / BY_SHA256, SHA256_PATTERN), (home.models, MATERIALISED_FOLDER),
                          (home.datasets, MATERIALISED_FOLDER)):  # fmt: skip
        try:
            first = path.relative_to(root).parts[0]
        except (ValueError, IndexError):
            continue
        return root / first if pattern.fullmatch(first) else None
    return None


def _job_entries(job: Job, home: Home) -> set[Path]:
    try:
        config = tomlkit.parse(job.config_toml).unwrap()
    except Exception:  # a job whose config cannot be read links nothing we can name
        return set()
    entries = set()
    for key in INPUT_KEYS:
        value = config.get(key)
        entry = _entry_of(Path(str(value)), home) if isinstance(value, str) and value else None
        if entry is not None:
            entries.add(entry)
    return entries


def _files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for folder, _dirs, names in os.walk(root):
        for name in names:
            yield Path(folder) / name


def _inode(path: Path) -> Inode | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


@dataclass
class InputUse:
    """What the worker's jobs link: entries and inodes of jobs that may still train, and each entry's last use."""

    protected_entries: dict[Path, list[str]] = field(default_factory=dict)
    last_used: dict[Path, float] = field(default_factory=dict)

    def protected_inodes(self) -> dict[Inode, list[str]]:
        """(device, inode) of every file in a protected entry, with the ids of the jobs that link it."""
        found: dict[Inode, list[str]] = {}
        for entry, job_ids in self.protected_entries.items():
            for path in _files(entry):
                inode = _inode(path)
                if inode is not None:
                    found.setdefault(inode, []).extend(job_ids)
        return found


def scan_jobs(store: JobStore, home: Home) -> InputUse:
    """Which materialised inputs the worker's jobs use (see the module doc)."""
    use = InputUse()
    protecting = _protecting()
    for job in store.iter_jobs():
        for entry in _job_entries(job, home):
            use.last_used[entry] = max(use.last_used.get(entry, 0.0), job.updated_at)
            if job.status in protecting:
                use.protected_entries.setdefault(entry, []).append(job.id)
    return use


def _remove(path: Path) -> int:
    """Remove a file or folder; the bytes whose last link went with it."""
    freed = 0
    for file in _files(path):
        with contextlib.suppress(OSError):
            stat = file.lstat()
            if stat.st_nlink == 1:
                freed += stat.st_size
    if path.is_dir():
        shutil.rmtree(
            path, ignore_errors=True
        )  # read-only links go too: unlinking needs the folder's write bit
    else:
        path.unlink(missing_ok=True)
    return freed


def delete_blob(home: Home, store: JobStore, blobs: BlobStore, sha256: str) -> dict[str, Any]:
    """Remove a blob (and its models/by-sha256 entry) unless jobs that may still train link it (BlobInUse).

    A partial upload of it goes too (unless a request is writing it). `links_left`: links in other materialised
    inputs (of completed jobs) that keep its bytes until `worker gc` removes them.
    """
    sha = validate_sha256(sha256)
    path = blobs.path(sha)
    if path is None:
        if blobs.remove_partial(sha):
            return {"sha256": sha, "partial": True, "freed_bytes": None, "links_left": 0}
        raise BlobNotFound(f"this worker holds no blob {sha[:12]}", "ask HEAD /blobs/{sha256} first")
    with materialise_lock(home.root):  # a submission reusing the blob waits, or is waited for
        use = scan_jobs(store, home)
        users = sorted(set(use.protected_inodes().get(_inode(path) or (-1, -1), [])))
        entry = home.models / BY_SHA256 / sha
        users += [j for j in use.protected_entries.get(entry, []) if j not in users]
        if users:
            raise BlobInUse(
                f"blob {sha[:12]} is linked by {len(users)} job(s) that may still train: {', '.join(users[:10])}",
                "delete or finish those jobs first (DELETE /jobs/{id}), then delete the blob",
                users,
            )
        freed = _remove(entry) if entry.is_dir() else 0
        links_left = path.stat().st_nlink - 1
        freed += _remove(path)
        return {"sha256": sha, "partial": False, "freed_bytes": freed, "links_left": links_left}


@dataclass
class GcReport:
    """What `worker gc` removed (and kept for being recent) and the bytes it gave back."""

    entries: int = 0
    blobs: int = 0
    partials: int = 0
    keys: int = 0
    freed_bytes: int = 0
    kept_recent: int = 0

    def summary(self) -> str:
        """One line for the CLI."""
        return (
            f"removed {self.blobs} blob(s), {self.entries} materialised input(s), {self.partials} partial "
            f"upload(s) and {self.keys} key(s) of deleted jobs; {_size(self.freed_bytes)} freed; "
            f"{self.kept_recent} unused item(s) kept as recent"
        )


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def collect_garbage(home_dir: Path, *, older_than_s: float) -> GcReport:
    """Remove what no job that may still train uses and nobody used for `older_than_s` (never less than 10
    minutes): materialised inputs, blobs no remaining input links, stale partial uploads, keys of deleted jobs."""
    if not (Path(home_dir) / BLOBS_DIR).is_dir():
        raise TrainManagementError(
            f"{home_dir} is not a worker's home (it has no {BLOBS_DIR}/ folder)",
            "pass the --home the worker was started with",
        )
    home = Home(home_dir)
    store = JobStore(home.root)
    blobs = BlobStore(home.root / BLOBS_DIR)
    report = GcReport()
    now = time.time()
    cutoff = now - max(older_than_s, MIN_AGE_S)
    with materialise_lock(home.root):  # a submission reusing an input waits, or is waited for
        use = scan_jobs(store, home)
        kept: list[Path] = []
        for entry in materialised_entries(home):
            if entry in use.protected_entries:
                kept.append(entry)
            elif max(_mtime(entry), use.last_used.get(entry, 0.0)) >= cutoff:
                kept.append(entry)
                report.kept_recent += 1
            else:
                report.freed_bytes += _remove(entry)
                report.entries += 1
        linked = {i for entry in kept for i in map(_inode, _files(entry)) if i is not None}
        for blob in blobs.complete_paths():
            if _inode(blob) in linked:
                continue
            if _mtime(blob) >= cutoff:
                report.kept_recent += 1
                continue
            report.freed_bytes += _remove(blob)
            report.blobs += 1
        removed, freed = blobs.remove_stale_partials(now - cutoff)
        report.partials += removed
        report.freed_bytes += freed
        report.keys += _prune_keys(home.root / KEYS_DIR, store, cutoff)
        for leftover in _leftovers(home, cutoff):
            report.freed_bytes += _remove(leftover)
    return report


def _prune_keys(keys_root: Path, store: JobStore, cutoff: float) -> int:
    """Drop idempotency keys older than `cutoff` whose job was deleted (IdempotencyKeys.prune)."""
    return IdempotencyKeys(keys_root, store).prune(cutoff)


def _leftovers(home: Home, cutoff: float) -> Iterable[Path]:
    """Temporary files and folders of materialisations that crashed half-way."""
    candidates = [*home.models.glob(".tmp-*"), *home.datasets.glob(".tmp-*")]
    by_sha = home.models / BY_SHA256
    if by_sha.is_dir():
        candidates += list(by_sha.glob("*/.*.tmp"))
    return [p for p in candidates if _mtime(p) < cutoff]
