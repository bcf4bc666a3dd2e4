"""Files that appear whole or not at all: the one atomic write every small file this project replaces goes through
(job records, configs, captions, caches, LoRAs, sample images)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

WriteFn = Callable[[IO[bytes], memoryview], object]
_WRITE_CHUNK = 1 << 20


def _write_all(handle: IO[bytes], data: memoryview) -> None:
    for start in range(0, len(data), _WRITE_CHUNK):
        handle.write(data[start : start + _WRITE_CHUNK])


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; some filesystems/OSes refuse to open a directory, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes | str, *, mode: int | None = None, write: WriteFn | None = None
) -> None:
    """Write `data` (str as UTF-8) to `path` through a uniquely named temporary file in the same folder: write,
    fsync, rename, fsync the folder. Readers see the old file or the whole new one; on any error the temporary file
    is removed and `path` keeps what it held. `mode` (0o600 for a file holding tokens) is set before any byte is
    written; `write` is the chunk writer (replaceable to inject faults)."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.chmod(tmp, mode)  # the umask may have taken bits off
            (write or _write_all)(handle, memoryview(payload))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any, *, mode: int | None = None) -> None:
    """`atomic_write` of `data` as indented JSON."""
    atomic_write(path, json.dumps(data, indent=2), mode=mode)
