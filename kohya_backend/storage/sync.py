"""Folders to and from S3, file by file: a prefix synced into a local folder (through the cache, so only new or
changed objects are downloaded), and a local folder uploaded under a prefix (files S3 already holds are skipped).
Like `aws s3 sync`, a sync leaves the folder's other files alone unless told to delete them (`delete=True`, for
folders the project owns, such as a job's staged dataset).

Keys under a synced prefix are attacker-controlled: every one is checked with `safe_relative_key` before anything
is written, and one key that could leave the destination ('..', absolute, backslashes) refuses the whole sync.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kohya_backend.errors import StorageError
from kohya_backend.storage.cache import S3Cache
from kohya_backend.storage.client import ObjectInfo, Progress, S3Client
from kohya_backend.storage.uri import S3Uri, UnsafeKey, safe_relative_key

MAX_SYNC_FILES = 100_000


@dataclass
class SyncStats:
    """What a sync or an upload did: files and bytes in all, bytes transferred, files already in place."""

    files: int = 0
    total: int = 0
    transferred: int = 0
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def prefix_entries(client: S3Client, uri: S3Uri) -> list[tuple[str, ObjectInfo]]:
    """(relative path, object) of every file under the prefix `uri`, sorted; folder markers and hidden files
    ('.DS_Store', '.cache/...') are left out, and UnsafeKey is raised for a key that could leave a folder."""
    prefix = uri.prefix()
    entries: list[tuple[str, ObjectInfo]] = []
    for info in client.list_objects(uri):
        relative = info.uri.key[len(prefix) :]
        if relative.endswith("/") and info.size == 0:
            continue  # a "folder" some tools create
        safe_relative_key(relative, what=f"the key {info.uri.key!r} under {uri}")
        if _hidden(relative):
            continue
        entries.append((relative, info))
        if len(entries) > MAX_SYNC_FILES:
            raise StorageError(f"{uri} holds more than {MAX_SYNC_FILES} files", "sync a smaller prefix")
    return sorted(entries, key=lambda e: e[0])


def _inside(dest: Path, relative: str) -> Path:
    """dest/relative, refusing (a second time, after safe_relative_key) anything that resolves outside dest."""
    root = os.path.realpath(dest)
    path = Path(os.path.realpath(os.path.join(root, relative)))
    if os.path.commonpath([root, str(path)]) != root:
        raise UnsafeKey(f"{relative!r} resolves outside {dest}", "sync into a folder without symlinks")
    return path


def sync_prefix(
    client: S3Client,
    cache: S3Cache,
    uri: S3Uri,
    dest: Path,
    *,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
    delete: bool = False,
) -> SyncStats:
    """Make `dest` hold the files under the prefix `uri`: new or changed objects come through the cache
    (downloaded once), unchanged ones stay. With `delete`, `dest`'s other (not hidden) files are removed, so it
    holds exactly the prefix: only for folders the project owns."""
    entries = prefix_entries(client, uri)
    if not entries:
        raise StorageError(
            f"{uri} holds no files",
            "check the prefix (`python -m kohya_backend s3 ls` lists it); a dataset holds <repeats>_<name>/ folders",
            code="NoSuchKey",
        )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    stats = SyncStats(files=len(entries), total=sum(info.size for _, info in entries))
    done, keep = 0, set[str]()
    for relative, info in entries:
        path = _inside(dest, relative)
        base = done

        def step(now: int, _total: int, base: int = base) -> None:
            if progress is not None:
                progress(base + now, stats.total)

        cached = cache.fetch(client, info, path, progress=step, cancelled=cancelled, keep=keep)
        keep.add(cached.sha256)
        stats.transferred += cached.fetched
        stats.unchanged += cached.unchanged
        done += info.size
        step(info.size, stats.total)
    if delete:
        stats.removed = _remove_others(dest, {relative for relative, _ in entries})
    return stats


def _remove_others(dest: Path, wanted: set[str]) -> list[str]:
    """Remove the files under `dest` whose relative paths are not `wanted` (hidden ones stay), then empty folders.
    A symlink is removed itself, never followed: nothing outside `dest` is touched."""
    removed: list[str] = []
    for folder, dirs, names in os.walk(dest, topdown=False):
        here = Path(folder)
        for name in names + [d for d in dirs if (here / d).is_symlink()]:
            relative = (here / name).relative_to(dest).as_posix()
            if relative not in wanted and not _hidden(relative):
                (here / name).unlink()
                removed.append(relative)
        for name in dirs:
            path = here / name
            if not path.is_symlink() and path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return removed


def local_files(root: Path) -> Iterator[tuple[Path, str]]:
    """Regular files under `root` with their relative POSIX paths, hidden files and folders skipped, sorted."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            if not name.startswith(".") and path.is_file():
                yield path, path.relative_to(root).as_posix()


def upload_folder(
    client: S3Client,
    folder: Path,
    uri: S3Uri,
    *,
    sha256: Callable[[Path], str],
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> SyncStats:
    """Upload every file under `folder` below the prefix `uri`; a file S3 holds already (same sha256 and size in
    its metadata) is not sent again. `sha256(path)` hashes a file (pass a cache's, so each is hashed once)."""
    files = list(local_files(Path(folder)))
    if not files:
        raise StorageError(f"{folder} holds no files to upload", "choose a folder with images and captions")
    stats = SyncStats(files=len(files), total=sum(p.stat().st_size for p, _ in files))
    done = 0
    for path, relative in files:
        size = path.stat().st_size
        base = done

        def step(now: int, _total: int, base: int = base) -> None:
            if progress is not None:
                progress(base + now, stats.total)

        sent = client.upload_file(
            path, uri.child(relative), sha256=sha256(path), progress=step, cancelled=cancelled
        )
        stats.transferred += size if sent else 0
        stats.unchanged += 0 if sent else 1
        done += size
    return stats
