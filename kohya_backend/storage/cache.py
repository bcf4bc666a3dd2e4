"""A content-addressed local cache of S3 objects: the second job on the same model downloads nothing.

An object version is known by (bucket, key, ETag, size); its bytes are kept once per sha256 in
`ROOT/blobs/ab/<sha256>` (read-only, like the worker's blob store), so two keys holding the same file share one
copy. Every blob was verified when it arrived (size, plus the sha256 in the object's metadata or the MD5 its ETag
is); `ROOT/index.sqlite3` maps object versions to blobs and records when each blob was last used. The cache is
capped in bytes: after each download the least recently used blobs go first (never those the caller still
needs). Users of a cached file get a hard link (a copy where links are impossible), made by `fetch` while it holds
the blob store's lock (`ROOT/blobs.lock`), which eviction takes too: a blob is never removed between being found
and being linked, and once linked, evicting it never removes a file a job is reading. Downloads in progress live in
`ROOT/partial/` and resume after a cut; a lock file beside each keeps two processes from writing the same one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kohya_backend.locks import file_lock
from kohya_backend.storage.client import DownloadResult, ObjectInfo, Progress, S3Client

DEFAULT_MAX_BYTES = 50 << 30
INDEX_NAME = "index.sqlite3"
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL, key TEXT NOT NULL, etag TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, PRIMARY KEY (bucket, key, etag, size));
CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, last_used REAL NOT NULL);
"""


@dataclass(frozen=True)
class Cached:
    """A fetched object: its blob (only safe to open while the blob store is locked: use the linked file), its
    sha256, the bytes fetched to get it (0: it was already here), and whether the destination already was it."""

    path: Path
    sha256: str
    fetched: int
    unchanged: bool = False


class S3Cache:
    """The cache under `root` (see the module doc), at most `max_bytes` of blobs after each download."""

    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        for folder in (self.blobs, self.partial):
            folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._db_path = self.root / INDEX_NAME
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._db_path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                yield db
        finally:
            db.close()

    def blob_path(self, sha256: str) -> Path:
        """Where the blob of `sha256` lives (it may not exist)."""
        return self.blobs / sha256[:2] / sha256

    # -- lookups --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _blobs_locked(self) -> Iterator[None]:
        """Held while a blob is found or stored and then linked, and while blobs are evicted (threads and processes:
        each holder opens the lock file anew, and flock locks of two open files exclude each other)."""
        with file_lock(self.blobs):
            yield

    def lookup(self, info: ObjectInfo) -> Cached | None:
        """The cached blob of this object version (its use recorded), or None when it has to be downloaded. Its path
        may be evicted at any time after: `fetch` links it where it is needed under the blob store's lock."""
        with self._db() as db:
            row = db.execute(
                "SELECT sha256 FROM objects WHERE bucket=? AND key=? AND etag=? AND size=?",
                (info.uri.bucket, info.uri.key, info.etag, info.size),
            ).fetchone()
        if row is None:
            return None
        path = self.blob_path(row[0])
        try:
            if path.stat().st_size != info.size:
                raise FileNotFoundError(path)
        except OSError:
            self._forget_blob(row[0])
            return None
        self._touch(row[0], info.size)
        return Cached(path, row[0], 0)

    def fetch(
        self,
        client: S3Client,
        info: ObjectInfo,
        dest: Path,
        *,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] | None = None,
        keep: Iterable[str] = (),
    ) -> Cached:
        """Make `dest` the object's file (a hard link to its blob, see link_file): from the cache, else downloaded
        (resuming a cut download) and verified; the blob is found (or stored) and linked under the blob store's
        lock, so eviction cannot remove it in between. Then the least recently used blobs beyond the cap are
        evicted, except those in `keep` (sha256s) and this one. One thread of one process at a time downloads an
        object version (two `train` commands share the cache)."""
        dest = Path(dest)
        with self._object_lock(info), file_lock(self.partial / _object_id(info)):
            with self._blobs_locked():
                hit = self.lookup(info)
                if hit is not None:
                    got = Cached(hit.path, hit.sha256, 0, _link(hit.path, dest))
            if hit is not None:
                if progress is not None:
                    progress(info.size, info.size)
            else:
                target = self.partial / _object_id(info)
                result: DownloadResult = client.download(info, target, progress=progress, cancelled=cancelled)
                with self._blobs_locked():
                    blob = self._store(target, result.sha256, info)
                    got = Cached(blob, result.sha256, result.fetched, _link(blob, dest))
        self.evict(keep={*keep, got.sha256})
        return got

    def _store(self, target: Path, sha256: str, info: ObjectInfo) -> Path:
        """Move a verified download into the blobs and index it (the blob store's lock is held)."""
        blob = self.blob_path(sha256)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if blob.exists():  # the same bytes under another key: keep the one copy
            target.unlink()
        else:
            os.chmod(target, 0o444)  # blobs are hard-linked into jobs: nothing may write through a link
            os.replace(target, blob)
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)",
                (info.uri.bucket, info.uri.key, info.etag, info.size, sha256),
            )
        self._touch(sha256, info.size)
        return blob

    def _object_lock(self, info: ObjectInfo) -> threading.Lock:
        key = _object_id(info)
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _touch(self, sha256: str, size: int) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)", (sha256, size, time.time()))

    def _forget_blob(self, sha256: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM objects WHERE sha256=?", (sha256,))
            db.execute("DELETE FROM blobs WHERE sha256=?", (sha256,))

    # -- size cap -------------------------------------------------------------------------------------------

    def usage(self) -> int:
        """Bytes of blobs the cache holds."""
        with self._db() as db:
            return int(db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0])

    def evict(self, *, keep: Iterable[str] = ()) -> list[str]:
        """Remove least recently used blobs until the cache fits max_bytes (never those in `keep`); their sha256s."""
        kept = set(keep)
        removed: list[str] = []
        with self._blobs_locked():
            with self._db() as db:
                rows = db.execute("SELECT sha256, size FROM blobs ORDER BY last_used ASC").fetchall()
            total = sum(size for _, size in rows)
            for sha, size in rows:
                if total <= self.max_bytes:
                    break
                if sha in kept:
                    continue
                path = self.blob_path(sha)
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(path, 0o644)
                    path.unlink()
                self._forget_blob(sha)
                removed.append(sha)
                total -= size
        return removed


def _object_id(info: ObjectInfo) -> str:
    """A file name for one object version (its partial download)."""
    text = f"{info.uri.bucket}\n{info.uri.key}\n{info.etag}\n{info.size}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _link(blob: Path, dest: Path) -> bool:
    """Link `dest` to `blob` unless it already is that file; True when it already was."""
    if same_file(blob, dest):
        return True
    link_file(blob, dest)
    return False


def link_file(source: Path, dest: Path) -> None:
    """Make `dest` the file `source` is: a hard link, or a copy where the filesystem has none. An existing
    `dest` is replaced (via a temporary name, so a reader never sees half a file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


def same_file(a: Path, b: Path) -> bool:
    """True when both paths are the same file (a hard link of each other)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
