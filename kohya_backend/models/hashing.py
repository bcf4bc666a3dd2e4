"""File hashes the WebUI and kohya's tools use to identify models and LoRAs."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from kohya_backend.fileio import atomic_write

_LEGACY_OFFSET = 0x100000
_LEGACY_SIZE = 0x10000
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Full-file sha256 (the WebUI's `sha256`, kohya's `ss_new_sd_model_hash`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def legacy_hash_bytes(data: bytes) -> str:
    """The WebUI's old short hash: first 8 hex of sha256 over 64 KiB at offset 1 MiB."""
    return hashlib.sha256(data[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_SIZE]).hexdigest()[:8]


def legacy_hash_file(path: Path) -> str:
    """`legacy_hash_bytes` read from a file without loading it whole (`ss_sd_model_hash`)."""
    with open(path, "rb") as fh:
        fh.seek(_LEGACY_OFFSET)
        return hashlib.sha256(fh.read(_LEGACY_SIZE)).hexdigest()[:8]


CACHE_ENV = "TRAIN_MANAGEMENT_HASH_CACHE"


def default_cache_path() -> Path:
    """Where known model hashes are kept: $TRAIN_MANAGEMENT_HASH_CACHE, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "train-management" / "sha256.json"


def _stamp(path: Path) -> dict[str, int]:
    """What identifies a file's content without reading it: size, mtime and inode (a file replaced by another of
    the same size and mtime, e.g. `cp -p` or rsync, has another inode)."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ino": stat.st_ino}


def _read_cache(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Sha256Cache:
    """The one sha256 cache file (absolute path -> size, mtime, inode, sha256), read once and written once for
    many files: the trainer's base model, every file sent to a remote worker, a worker's inputs and outputs."""

    def __init__(self, cache: Path | None = None) -> None:
        self.path = Path(cache) if cache is not None else default_cache_path()
        self._entries = _read_cache(self.path)
        self._new: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> str | None:
        """The sha256 recorded for `path` while its size, mtime and inode are unchanged, else None."""
        key = str(Path(path).resolve())
        with self._lock:
            entry = self._new.get(key) or self._entries.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            return None
        stamp = _stamp(Path(path))
        return str(entry["sha256"]) if all(entry.get(k) == v for k, v in stamp.items()) else None

    def remember(self, path: Path, digest: str) -> None:
        """Record `digest` for `path` as it is now (kept in memory until save())."""
        self._record(Path(path), _stamp(Path(path)), digest)

    def _record(self, path: Path, stamp: dict[str, int], digest: str) -> None:
        with self._lock:
            self._new[str(path.resolve())] = {**stamp, "sha256": digest}

    def sha256(self, path: Path) -> str:
        """The file's sha256: from the cache, or computed and recorded (unless the file changed meanwhile)."""
        path = Path(path)
        hit = self.get(path)
        if hit is not None:
            return hit
        before = _stamp(path)
        digest = sha256_file(path)
        if _stamp(path) == before:
            self._record(path, before, digest)
        return digest

    def save(self) -> None:
        """Merge what was recorded into the file (re-read first: other processes add entries too), dropping files
        that no longer exist so the cache does not grow forever; a cache that cannot be written is skipped."""
        with self._lock:
            new = dict(self._new)
        if not new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = {
                k: v for k, v in _read_cache(self.path).items() if os.path.exists(k)
            }  # forget deleted files
            data.update(new)
            atomic_write(self.path, json.dumps(data, indent=1))
        except OSError:
            return
        with self._lock:
            self._entries = data
            for key, entry in new.items():
                if self._new.get(key) == entry:
                    del self._new[key]


BACKGROUND_NICE = 19


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> bool:
    """Give the calling thread (only it: Linux sets nice values per thread) the lowest CPU priority; returns whether
    it applied (Linux only; lowering needs no privilege)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        return False
    return True


class BackgroundSha256:
    """A file's sha256, from the cache or computed in a thread started now, so hashing a 2-7 GB checkpoint
    overlaps loading and training instead of delaying the first save (hashlib releases the GIL).

    The thread runs at the lowest priority: on a 2-core machine it fills the core that imports and loading leave
    idle, instead of taking a core from latent caching and the first steps (a 4.3 GB file is ~3 s of one core)
    and stalling their two-thread kernels. What is left when the first save needs the digest runs at full speed.
    """

    def __init__(self, path: Path, cache: Path | None = None) -> None:
        self.path = Path(path)
        self._store = Sha256Cache(cache)
        self._digest = self._store.get(self.path)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self._digest is None:
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        lower_thread_priority()
        try:
            self._digest = self._store.sha256(self.path)
            self._store.save()
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> str:
        """The hex digest (waits for the thread); re-raises what the thread hit (e.g. the file vanished)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return str(self._digest)
