"""Which of this machine's devices a job gets: one slot of one device, or N GPUs for a data-parallel job.

A job asks for N GPUs with params["gpus"] ("GPUs per job"; 1 when absent). It then holds one slot on each of N
distinct `cuda:K` devices, named together as `cuda:0,1` (the runner turns that into CUDA_VISIBLE_DEVICES=0,1 and
`--num-processes 2`), and counts on each of them for concurrency. A machine without CUDA GPUs runs N processes
on its CPU (gloo; slow, but the same code path: for trying it out and for tests); Apple's MPS is one GPU.
Pure functions over the scheduler's `devices` ({device: slots}), so every rule is tested with made-up machines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.devices import CPU_DEVICE, MPS_DEVICE

GPUS_PARAM = "gpus"
MAX_GPUS = 64


def gpus_of(params: Mapping[str, Any]) -> int:
    """The number of GPUs (processes) a job asks for: params["gpus"], 1 when absent."""
    value = params.get(GPUS_PARAM, 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def check_gpus_value(value: object) -> int:
    """A "GPUs per job" value as given (API, tab, CLI), checked: a whole number from 1 to MAX_GPUS."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_GPUS:
        raise TrainManagementError(
            f"GPUs per job must be a whole number from 1 to {MAX_GPUS}, got {value!r}",
            "ask for 1 GPU, or for as many as the instance type has (data-parallel training)",
        )
    return value


def members(device: str) -> list[str]:
    """The devices a run holds: 'cuda:0,1' -> ['cuda:0', 'cuda:1']; any single device -> [device]."""
    kind, sep, rest = device.partition(":")
    if kind == "cuda" and sep and "," in rest:
        return [f"cuda:{index}" for index in rest.split(",")]
    return [device]


def group(devices: list[str]) -> str:
    """The name of several CUDA devices held together: ['cuda:0', 'cuda:2'] -> 'cuda:0,2'."""
    return "cuda:" + ",".join(d.partition(":")[2] for d in devices)


def _gpus(devices: Mapping[str, int]) -> list[str]:
    return sorted((d for d in devices if d.startswith("cuda:")), key=lambda d: int(d.partition(":")[2]))


def check_request(devices: Mapping[str, int], gpus: int, pinned: str | None) -> None:
    """Refuse at submission a job this machine can never start: more GPUs than it has, several on Apple's MPS, or
    several together with a pinned device."""
    if gpus == 1:
        return
    if pinned is not None:
        raise TrainManagementError(
            f"the job pins device {pinned!r} and asks for {gpus} GPUs",
            "leave the device out: the scheduler picks the GPUs of a multi-GPU job",
        )
    found = _gpus(devices)
    if found and gpus > len(found):
        raise TrainManagementError(
            f"the job asks for {gpus} GPUs, but this machine has {len(found)} ({', '.join(found)})",
            f"ask for at most {len(found)} GPUs per job",
        )
    if not found and MPS_DEVICE in devices:
        raise TrainManagementError(
            f"the job asks for {gpus} GPUs, but this Mac has one (MPS)",
            "ask for 1 GPU per job",
        )


def choose(free: Mapping[str, int], gpus: int, pinned: str | None) -> str | None:
    """The device (or GPU group) a queued job starts on now, given the free slots per device; None: wait.

    One GPU: the pinned device, else the one with the most free slots. N GPUs: the N CUDA devices with the most
    free slots (lowest indices first), or the CPU of a machine that has no CUDA GPU.
    """
    if gpus == 1 or pinned is not None:
        if pinned is not None:
            return pinned if free.get(pinned, 0) > 0 else None
        return max(free, key=lambda d: free[d]) if free and max(free.values()) > 0 else None
    found = _gpus(free)
    if not found:
        return CPU_DEVICE if free.get(CPU_DEVICE, 0) > 0 else None
    ready = sorted((d for d in found if free[d] > 0), key=lambda d: (-free[d], int(d.partition(":")[2])))
    if len(ready) < gpus:
        return None
    chosen = sorted(ready[:gpus], key=lambda d: int(d.partition(":")[2]))
    return group(chosen)


def take(free: dict[str, int], device: str) -> None:
    """Count a started run's devices as used in `free`."""
    for member in members(device):
        free[member] = free.get(member, 0) - 1


def known(device: str, devices: Mapping[str, int]) -> bool:
    """Whether every device of `device` (a single one or a GPU group) is one of this machine's."""
    return all(member in devices for member in members(device))


def processes_for(device: str | None, gpus: int) -> int:
    """How many training processes a run on `device` starts: one per GPU of a group, N on a CPU that stands in for
    N GPUs, else one."""
    if device is None:
        return gpus
    held = members(device)
    return len(held) if len(held) > 1 else (gpus if device == CPU_DEVICE else 1)
