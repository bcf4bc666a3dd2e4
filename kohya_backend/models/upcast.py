"""Upcasting a checkpoint's kept fp16/bf16 frozen weights to fp32 once, when the run's measured peak leaves room.

A CPU run keeps the frozen Linear/Conv2d weights an fp16 file stores in fp16 and upcasts each as its layer runs
(models/frozen.py): half their memory, but every forward and backward pays a copy, 10-20% of the frozen layers'
time (bench/README.md). After the first step the trainer knows the run's peak memory; when the fp32 copies plus
that step's own rise fit the memory the system still has, with a margin, the weights are upcast once and every
later step runs as from an fp32 file, else they stay as stored. The numbers are the same either way (an fp16
value upcast is exact); the choice and its figures go to the log and to a "weights" event.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from kohya_backend.errors import ModelError
from kohya_backend.models.frozen import release_upcast_buffers
from kohya_backend.models.pages import release_tensor_pages

MODE_ENV = "TRAIN_MANAGEMENT_FROZEN_WEIGHTS"
MODES = ("auto", "upcast", "keep")
MARGIN_MIN = 2**30  # bytes always left free, and at least MARGIN_FRACTION of the machine's memory
MARGIN_FRACTION = 0.1
_LOWER = (torch.float16, torch.bfloat16)
_GB = 1e9


@dataclass(frozen=True)
class MemoryFacts:
    """Bytes: what the system can still give (Linux's MemAvailable), its total, this process's RSS now and peak."""

    available: int
    total: int
    rss: int
    peak_rss: int


@dataclass(frozen=True)
class KeptWeight:
    """A frozen parameter left in its file's fp16/bf16: the module holding it and its name there."""

    module: nn.Module
    name: str
    tensor: torch.Tensor


@dataclass(frozen=True)
class UpcastChoice:
    """Whether the kept weights are upcast, and the figures that decided it."""

    upcast: bool
    mode: str
    stored_bytes: int  # the kept weights as stored
    fp32_bytes: int  # their fp32 copies
    estimated_peak: int  # this process's peak RSS with the fp32 copies
    needed: int  # what the upcast asks of the system: the fp32 copies plus the step's rise above RSS now, per process
    margin: int
    facts: MemoryFacts

    def message(self) -> str:
        """The log line: what was chosen and why, in GB."""
        sizes = f"{self.stored_bytes / _GB:.2f} GB of fp16/bf16 frozen weights"
        figures = (
            f"{self.needed / _GB:.2f} GB needed + {self.margin / _GB:.2f} GB margin, "
            f"{self.facts.available / _GB:.2f} GB available; estimated peak RSS {self.estimated_peak / _GB:.2f} GB"
        )
        if self.mode != "auto":
            figures = f"{MODE_ENV}={self.mode}; {figures}"
        if self.upcast:
            return (
                f"upcast {sizes} to fp32 once ({self.fp32_bytes / _GB:.2f} GB; {figures}): later steps skip the "
                "per-layer upcast, same results"
            )
        return (
            f"kept {sizes} as stored ({figures}): each layer upcasts its weight as it runs, same results, "
            f"{(self.fp32_bytes - self.stored_bytes) / _GB:.2f} GB less memory"
        )

    def event_fields(self) -> dict[str, object]:
        """The "weights" event's fields."""
        return {
            "choice": "upcast" if self.upcast else "kept",
            "mode": self.mode,
            "message": self.message(),
            "stored_gb": round(self.stored_bytes / _GB, 3),
            "fp32_gb": round(self.fp32_bytes / _GB, 3),
            "estimated_peak_gb": round(self.estimated_peak / _GB, 3),
            "available_gb": round(self.facts.available / _GB, 3),
        }


def upcast_mode() -> str:
    """`TRAIN_MANAGEMENT_FROZEN_WEIGHTS`: "auto" (unset: decide by memory), "upcast" or "keep" (for benchmarks)."""
    mode = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ModelError(
            f"{MODE_ENV}={os.environ[MODE_ENV]!r} is not one of {', '.join(MODES)}",
            hint=f"unset {MODE_ENV} (the trainer then decides by memory) or set it to one of those",
        )
    return mode


def _peak_rss(process: psutil.Process) -> int:
    """This process's peak RSS in bytes: Linux's VmHWM, Windows' peak working set, else getrusage's."""
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/self/status").read_text(encoding="ascii", errors="replace").splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    peak = getattr(process.memory_info(), "peak_wset", None)
    if peak is not None:
        return int(peak)
    import resource  # POSIX only; Windows answered above

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def memory_facts() -> MemoryFacts:
    """The machine's and this process's memory now."""
    memory = psutil.virtual_memory()
    process = psutil.Process()
    rss = int(process.memory_info().rss)
    return MemoryFacts(int(memory.available), int(memory.total), rss, max(rss, _peak_rss(process)))


def kept_weights(modules: Iterable[nn.Module]) -> list[KeptWeight]:
    """The fp16/bf16 parameters of `modules` held on the CPU (a module dropped to the meta device has none)."""
    found = []
    for module in modules:
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if param.dtype in _LOWER and param.device.type == "cpu":
                    found.append(KeptWeight(sub, name, param))
    return found


def choose_upcast(
    kept: Iterable[KeptWeight], facts: MemoryFacts, mode: str = "auto", *, processes: int = 1
) -> UpcastChoice:
    """Upcast when the fp32 copies plus the step's rise above RSS now, and a margin, fit the available memory.

    `processes`: the data-parallel processes on this machine (a CPU run's are all local), each of which makes the
    same copies and the same rise. The estimated peak (one process's) counts the kept weights' file pages as given
    back (they are released once copied).
    """
    kept = list(kept)
    numels = [w.tensor.numel() for w in kept]
    stored = sum(w.tensor.numel() * w.tensor.element_size() for w in kept)
    fp32 = 4 * sum(numels)
    needed = processes * (fp32 + max(0, facts.peak_rss - facts.rss))
    margin = max(MARGIN_MIN, int(MARGIN_FRACTION * facts.total))
    fits = needed + margin <= facts.available
    upcast = fits if mode == "auto" else mode == "upcast"
    estimated = facts.peak_rss + fp32 - stored
    return UpcastChoice(upcast, mode, stored, fp32, estimated, needed, margin, facts)


def upcast_weights(kept: Iterable[KeptWeight], *, release_pages: bool) -> int:
    """Replace each kept parameter with an fp32 copy, one at a time; returns the bytes of the copies.

    With `release_pages` (weights memory-mapped from a .safetensors file) each source's pages are given back at
    once, so the fp16 and fp32 copies of the whole model never count together. Layers routed through
    models/frozen.py then use their weights as they are, and their upcast buffers are dropped.
    """
    total = 0
    with torch.no_grad():
        for weight in kept:
            old = weight.tensor
            copy = nn.Parameter(old.to(torch.float32), requires_grad=False)
            setattr(weight.module, weight.name, copy)
            total += copy.numel() * copy.element_size()
            if release_pages:
                release_tensor_pages([old])
    release_upcast_buffers()
    return total
