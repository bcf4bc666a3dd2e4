"""How a run stores the base model's frozen weights: decided before loading, said in the log after it.

On the CPU, Linear/Conv2d weights that a checkpoint stores in fp16/bf16 are loaded as stored and upcast as each
layer runs (models/frozen.py), with the same fp32 results as weights upcast at load and no load-time copy; once
the first step has shown the run's peak memory, they are upcast for good when the fp32 copies fit
(models/upcast.py). Under bf16 autocast (mixed_precision = "bf16" on the CPU) they are stored in bf16, which is
what autocast rounds them to on every call: half the memory and no cast per call, with the numbers autocast gives.
On a GPU every weight is cast to the run's dtype at load, as kohya does.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# CPU flags of native bf16 arithmetic: x86's AVX512-BF16 and AMX, ARM's BF16 extension
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class WeightPlan:
    """What `load_checkpoint` is asked for (`keep_file_precision`, `compute_dtype`) and what to warn about."""

    keep_file_precision: bool
    compute_dtype: torch.dtype | None
    warnings: tuple[str, ...] = ()


def has_bf16_flags(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text lists a native bf16 instruction set on its flags (x86) or features (ARM)."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features") and _BF16_FLAGS & set(value.split()):
            return True
    return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively; elsewhere oneDNN emulates it, slower than fp32."""
    if sys.platform.startswith("linux"):
        try:
            return has_bf16_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def plan_weights(
    device: torch.device | str, autocast_dtype: torch.dtype | None, *, native_bf16: bool | None = None
) -> WeightPlan:
    """The frozen-weight storage for a run on `device` whose forward passes autocast to `autocast_dtype` (or not);
    `native_bf16` says whether the CPU computes bf16 natively (None: ask it)."""
    if torch.device(device).type != "cpu":
        return WeightPlan(keep_file_precision=False, compute_dtype=None)
    if autocast_dtype != torch.bfloat16:
        return WeightPlan(keep_file_precision=True, compute_dtype=None)
    warnings: tuple[str, ...] = ()
    if not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        warnings = (
            'mixed_precision = "bf16": this CPU has no native bf16 instructions (avx512_bf16, AMX or ARM bf16), '
            'so bf16 is emulated and slower than fp32; use mixed_precision = "no" here',
        )
    return WeightPlan(keep_file_precision=True, compute_dtype=torch.bfloat16, warnings=warnings)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def describe_weights(modules: Iterable[nn.Module], plan: WeightPlan, device: torch.device | str) -> str:
    """One log line: the frozen weights' bytes per dtype on `device` and how they compute."""
    sizes: dict[torch.dtype, int] = defaultdict(int)
    for module in modules:
        for param in module.parameters():
            if not param.is_meta:
                sizes[param.dtype] += param.numel() * param.element_size()
    held = ", ".join(
        f"{_gb(n)} {str(d).removeprefix('torch.')}" for d, n in sorted(sizes.items(), key=lambda kv: -kv[1])
    )
    text = f"frozen base-model weights on {torch.device(device).type}: {held}"
    if plan.compute_dtype == torch.bfloat16:
        return text + (
            "; Linear/Conv2d weights stored in bf16 for bf16 autocast (the VAE keeps its precision), "
            "LoRA weights and optimizer in fp32"
        )
    if plan.keep_file_precision and any(d in sizes for d in (torch.float16, torch.bfloat16)):
        return text + (
            "; the checkpoint's fp16/bf16 Linear/Conv2d weights are kept as stored and upcast to fp32 as each "
            "layer runs (the results of weights upcast at load, for half their memory) until the first step shows "
            "whether fp32 copies fit"
        )
    return text
