"""Process-level tuning for the trainer process (never the WebUI's)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Keep glibc from mmap-ing and zeroing every large activation anew each step (a CPU training hot spot).

    Raises malloc's mmap threshold to its 32 MiB maximum and its trim threshold to 1 GiB, so freed activation
    buffers are reused from the heap. Returns whether it applied (glibc Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
        )
    except (OSError, AttributeError):
        return False
