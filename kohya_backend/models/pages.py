"""Handing the pages of memory-mapped weights back to the kernel once they have been read for the last time.

Weights read from a memory-mapped checkpoint stay resident, and count in the process's RSS, for as long as the
file's mapping lives, which is until the last tensor of the file is dropped. madvise(MADV_DONTNEED) releases
them at once; a file-backed page read again later simply comes back from the file. Hand-written with ctypes:
neither torch nor safetensors exposes madvise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by process set-up code that runs before (or without) torch
    from torch import Tensor

_MADV_DONTNEED = 4
_PAGE = 4096


@functools.cache
def _madvise() -> Any:
    """libc's madvise, or None off glibc Linux."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def release_tensor_pages(tensors: Iterable[Tensor]) -> int:
    """Release the whole pages inside each CPU tensor's bytes; returns the bytes advised.

    Only pages lying wholly inside a tensor are touched, so neighbouring tensors of the same file keep theirs.
    Call it only on tensors that are never read again, or on file-backed ones (their pages are re-read from the
    file): anonymous memory released this way reads back as zeros.
    """
    madvise = _madvise()
    if madvise is None:
        return 0
    released = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first, last = -(-start // _PAGE) * _PAGE, (end // _PAGE) * _PAGE
        if last > first and madvise(first, last - first, _MADV_DONTNEED) == 0:
            released += last - first
    return released
