"""File hashes the WebUI and kohya's tools use to identify models and LoRAs."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

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
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_cache(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_sha256(path: Path, cache: Path | None = None) -> str | None:
    """The sha256 recorded for `path` while its size and mtime are unchanged, else None."""
    key = str(Path(path).resolve())
    entry = _read_cache(cache or default_cache_path()).get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return None
    return (
        str(entry["sha256"])
        if {k: entry.get(k) for k in ("size", "mtime_ns")} == _stamp(Path(path))
        else None
    )


def remember_sha256(path: Path, digest: str, cache: Path | None = None) -> None:
    """Record `digest` for `path` (with its size and mtime); a cache that cannot be written is skipped."""
    cache = cache or default_cache_path()
    key = str(Path(path).resolve())
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(cache)  # re-read: another trainer may have added entries meanwhile
        data[key] = {**_stamp(Path(path)), "sha256": digest}
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        return  # only a cache: the next run hashes again


class BackgroundSha256:
    """A file's sha256, from the cache or computed in a thread started now, so hashing a 2-7 GB checkpoint
    overlaps loading and training instead of delaying the first save (hashlib releases the GIL)."""

    def __init__(self, path: Path, cache: Path | None = None) -> None:
        self.path = Path(path)
        self.cache = cache
        self._digest = cached_sha256(self.path, cache)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self._digest is None:
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._digest = sha256_file(self.path)
            remember_sha256(self.path, self._digest, self.cache)
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> str:
        """The hex digest (waits for the thread); re-raises what the thread hit (e.g. the file vanished)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return str(self._digest)
