"""Process-level tuning for the trainer process (never the WebUI's)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Any

from kohya_backend.models.pages import release_tensor_pages

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


def release_pages(module: Any) -> int:
    """Give the kernel back the resident pages of a module's weights before dropping it; returns bytes advised.

    Weights loaded from a memory-mapped checkpoint stay resident (and counted) after the module is dropped,
    because the mapping lives on for the other components. Call only on weights that are never read again.
    """
    return release_tensor_pages([*module.parameters(), *module.buffers()])


def hide_bitsandbytes_unless_needed(optimizer_type: str) -> bool:
    """Make bitsandbytes look absent in a trainer process whose optimizer does not use it; returns whether it did.

    diffusers and peft import bitsandbytes whenever it is installed (0.7 s here, and a warning about missing CPU
    kernels in the job's log) only to offer quantized loading, which this trainer never does. A None entry in
    sys.modules makes importlib.util.find_spec() answer None, so they treat it as not installed. Call it in the
    trainer process before diffusers is imported; only the 8-bit optimizers need the package. Once diffusers or
    peft is imported it has already judged bitsandbytes present, and hiding it then would break their imports.
    """
    if "8bit" in optimizer_type.lower() or any(
        m in sys.modules for m in ("bitsandbytes", "diffusers", "peft")
    ):
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    return True


class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of `needles`."""

    def __init__(self, needles: tuple[str, ...]) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


def quiet_library_noise() -> None:
    """Keep warnings that concern nothing this trainer does out of the job's log.

    transformers warns, when diffusers' pipelines are imported for sample images, that image processors we never
    use would prefer torchvision; a user reading the log would take it for a problem to fix.
    """
    logging.getLogger("transformers.utils.import_utils").addFilter(
        _DropMessages(("requires torchvision (not installed)",))
    )
