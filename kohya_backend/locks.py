"""Cross-process file locks: one exclusive `flock` on PATH.lock, shared by the job registry, the worker and the S3
cache (a neutral module, so storage/ and service/ need not import jobs/ for it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on PATH.lock (created 0600) across processes; no-op where flock is missing."""
    if os.name != "posix":
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + LOCK_SUFFIX), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
