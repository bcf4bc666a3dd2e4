"""The devices this machine can train on (CUDA/ROCm GPUs, Apple's MPS, the CPU), found without importing torch.

The host process (the WebUI or the standalone app) must stay light until a job runs, and the trainer may use
another interpreter than the host, so GPUs are read from `nvidia-smi` (physical indices, names, memory) and
filtered by CUDA_VISIBLE_DEVICES; torch is asked only when a GPU driver is present without nvidia-smi (an NVIDIA
driver without its tools, or AMD's ROCm, whose GPUs torch reports as CUDA devices). Device names are `cuda:N`
with N the physical index, which the runner passes on as CUDA_VISIBLE_DEVICES=N (ROCm honours it too), `mps` on
Apple silicon, and `cpu`.
"""

from __future__ import annotations

import functools
import os
import platform as platform_module
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_QUERY = ["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
# Loaded GPU compute drivers (Linux): NVIDIA's kernel module, and AMD's ROCm compute device.
_GPU_DRIVERS = (Path("/sys/module/nvidia"), Path("/dev/kfd"))
MPS_DEVICE = "mps"
CPU_DEVICE = "cpu"


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU: physical index, UUID, product name and memory in MiB (None when unknown)."""

    index: int
    uuid: str
    name: str
    memory_mib: int | None

    @property
    def device(self) -> str:
        """The scheduler's name for it."""
        return f"cuda:{self.index}"

    @property
    def label(self) -> str:
        """'NVIDIA H200 (140 GB)'-style text for lists."""
        if self.memory_mib is None:
            return self.name
        return f"{self.name} ({round(self.memory_mib / 1024)} GB)"


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """The GPUs in nvidia-smi's `index,uuid,name,memory.total` CSV (no header, no units); bad lines are skipped."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        index, uuid, memory = int(parts[0]), parts[1], parts[-1]
        name = ", ".join(parts[2:-1])
        gpus.append(Gpu(index, uuid, name, int(memory) if memory.isdigit() else None))
    return gpus


def visible(gpus: list[Gpu], spec: str | None) -> list[Gpu]:
    """The GPUs CUDA_VISIBLE_DEVICES=`spec` lets a process use (None: all; '' or '-1': none), in its order."""
    if spec is None:
        return list(gpus)
    chosen: list[Gpu] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item or item.startswith("-"):
            break  # CUDA stops at the first invalid entry
        match = [g for g in gpus if (item.isdigit() and g.index == int(item)) or g.uuid.startswith(item)]
        if not match:
            break
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def _from_torch() -> list[Gpu]:
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = [torch.cuda.get_device_name(i) for i in range(count)]
    except Exception:  # a broken CUDA setup: train on the CPU
        return []
    # torch counts the visible GPUs from 0; the runner needs their physical indices.
    spec = [s.strip() for s in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
    physical = [int(s) for s in spec] if spec and all(s.isdigit() for s in spec) else list(range(count))
    return [Gpu(physical[i] if i < len(physical) else i, "", name, None) for i, name in enumerate(names)]


@functools.lru_cache(maxsize=1)
def detect_gpus() -> tuple[Gpu, ...]:
    """The GPUs visible to this process (cached: GPUs do not come and go while it runs)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        # Without a driver there is no CUDA (or ROCm) GPU, and torch need not be imported to learn that.
        return tuple(_from_torch()) if any(driver.exists() for driver in _GPU_DRIVERS) else ()
    try:
        out = subprocess.run([exe, *_QUERY], capture_output=True, text=True, timeout=15, check=True)
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(visible(parse_nvidia_smi(out.stdout), os.environ.get("CUDA_VISIBLE_DEVICES")))


def has_mps(platform: str | None = None, machine: str | None = None) -> bool:
    """Whether this is Apple silicon under macOS, where torch trains on the GPU through MPS (the trainer's pinned
    torch has no build for Intel Macs, so there MPS is all there is besides the CPU)."""
    return (platform or sys.platform) == "darwin" and (machine or platform_module.machine()) == "arm64"


def default_slots(gpus: Sequence[Gpu], *, mps: bool) -> dict[str, int]:
    """One job slot per visible GPU ('cuda:0', ...), else one 'mps' slot on Apple silicon, else one 'cpu' slot."""
    if gpus:
        return {gpu.device: 1 for gpu in gpus}
    return {MPS_DEVICE: 1} if mps else {CPU_DEVICE: 1}


def local_label(devices: Iterable[str], gpus: Sequence[Gpu]) -> str:
    """The Training Instance Type label of this machine: its GPUs, 'this Mac (MPS)', or 'this machine (CPU)'."""
    names = set(devices)
    found = [gpu.label for gpu in gpus if gpu.device in names]
    if found:
        return f"this machine ({', '.join(found)})"
    if MPS_DEVICE in names:
        return "this Mac (MPS)"
    return "this machine (CPU)"


def runs_fp16(devices: Iterable[str]) -> bool:
    """Whether these devices train in fp16 mixed precision (CUDA and ROCm GPUs, Apple's MPS; not the CPU)."""
    return any(d.startswith("cuda") or d == MPS_DEVICE for d in devices)


def device_kind(device: str) -> str:
    """'cuda', 'mps' or 'cpu' for a device name ('cuda:N', a GPU group 'cuda:N,M' of a multi-GPU job, 'mps',
    'cpu'); ValueError for anything else."""
    if device in (CPU_DEVICE, MPS_DEVICE):
        return device
    kind, _, indices = device.partition(":")
    if kind == "cuda" and all(index.isdigit() for index in indices.split(",")):
        return kind
    raise ValueError(f"unknown device {device!r}")
