"""Which device the trainer uses (CUDA, ROCm, Apple's MPS or the CPU) and what that device allows.

The rules are pure functions of a few facts (DeviceFacts), so every platform's are tested anywhere; torch is asked
for the facts only in detect_facts(). The host's runner names the kind of device it gave the job in
TRAIN_MANAGEMENT_DEVICE ("cuda", "mps" or "cpu"); without it the trainer takes the best one present.

Precision, as kohya does through accelerate: CUDA (ROCm's torch reports itself as CUDA) takes fp16 and bf16 as
asked, frozen weights in that dtype. MPS takes fp16 (accelerate's autocast with a grad scaler, torch >= 2.5) and
bf16 where macOS supports it (14 or newer; else fp32, with a warning), frozen weights in that dtype. The CPU trains
in fp32 (bf16 as accelerate's CPU autocast; fp16, which the CPU cannot do, becomes fp32 with a warning).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from kohya_backend.errors import TrainingError

DEVICE_ENV = "TRAIN_MANAGEMENT_DEVICE"
KINDS = ("cuda", "mps", "cpu")
# Optimizers that exist only as bitsandbytes kernels, and the 32-bit optimizer that does the same job without it.
BITSANDBYTES_OPTIMIZERS = {
    "adamw8bit": "AdamW",
    "pagedadamw": "AdamW",
    "pagedadamw8bit": "AdamW",
    "pagedadamw32bit": "AdamW",
    "lion8bit": "Lion",
    "pagedlion8bit": "Lion",
    "sgdnesterov8bit": "SGDNesterov",
}


@dataclass(frozen=True)
class DeviceFacts:
    """What the trainer's torch reports: CUDA (and whether it is ROCm's HIP), MPS and its bf16 support."""

    cuda: bool
    mps: bool = False
    rocm: bool = False
    mps_bf16: bool = False
    forced: str | None = None


@dataclass(frozen=True)
class DevicePlan:
    """The device kind, the mixed precision accelerate gets, the frozen weights' dtype ('no' = fp32), and notes
    (warnings for the job's log) about anything asked for that this device does differently."""

    kind: str
    mixed_precision: str
    weight_dtype: str
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """'CUDA', 'ROCm', 'MPS' or 'CPU' for messages."""
        return {"cuda": "CUDA", "mps": "MPS", "cpu": "CPU"}[self.kind]


def detect_facts(environ: Mapping[str, str] | None = None) -> DeviceFacts:
    """Ask torch (imported here) what this process can train on; the runner's TRAIN_MANAGEMENT_DEVICE comes along."""
    import torch

    env = os.environ if environ is None else environ
    cuda = bool(torch.cuda.is_available())
    backend = getattr(torch.backends, "mps", None)
    mps = bool(backend is not None and backend.is_available())
    mps_bf16 = False
    if mps:
        check = getattr(backend, "is_macos_or_newer", None)
        mps_bf16 = bool(check(14, 0)) if callable(check) else False
    forced = env.get(DEVICE_ENV, "").strip().lower() or None
    return DeviceFacts(cuda, mps, bool(getattr(torch.version, "hip", None)), mps_bf16, forced)


def _kind(facts: DeviceFacts) -> str:
    present = {"cuda": facts.cuda, "mps": facts.mps, "cpu": True}
    if facts.forced is None:
        return next(kind for kind in KINDS if present[kind])
    if facts.forced not in present:
        raise TrainingError(
            f"{DEVICE_ENV}={facts.forced!r} is not a device kind", f"use one of: {', '.join(KINDS)}"
        )
    if not present[facts.forced]:
        raise TrainingError(
            f"the job was given a {facts.forced.upper()} device, but torch in the trainer's environment sees none",
            "install a torch build for this GPU in the trainer's environment (see the README's install section), "
            "or train on the CPU",
        )
    return facts.forced


def plan_device(mixed_precision: str, facts: DeviceFacts) -> DevicePlan:
    """The device and precision for a run whose config asks for `mixed_precision` ('no', 'fp16' or 'bf16')."""
    kind = _kind(facts)
    if kind == "cuda":
        return DevicePlan(kind, mixed_precision, mixed_precision)
    if kind == "mps":
        if mixed_precision == "bf16" and not facts.mps_bf16:
            note = 'mixed_precision = "bf16" needs macOS 14 or newer on MPS: training in fp32 instead'
            return DevicePlan(kind, "no", "no", (note,))
        return DevicePlan(kind, mixed_precision, mixed_precision)
    if mixed_precision == "fp16":
        note = 'mixed_precision = "fp16" needs a GPU: training in fp32 on the CPU instead'
        return DevicePlan(kind, "no", "no", (note,))
    return DevicePlan(kind, mixed_precision, "no")


def device_label(plan: DevicePlan, facts: DeviceFacts) -> str:
    """'ROCm' for CUDA through AMD's HIP, else the plan's label."""
    return "ROCm" if plan.kind == "cuda" and facts.rocm else plan.label


def optimizer_for_platform(name: str, platform: str | None = None) -> tuple[str, str | None]:
    """The optimizer to build for `name` here, and a warning when it had to change.

    bitsandbytes has no macOS build (requirements skip it there), so its 8-bit optimizers are skipped on macOS in
    favour of their 32-bit versions: the same updates, with more optimizer memory (small for a LoRA).
    """
    instead = BITSANDBYTES_OPTIMIZERS.get(name.lower())
    if instead is None or (platform or sys.platform) != "darwin":
        return name, None
    return instead, (
        f"optimizer_type {name} needs bitsandbytes, which has no macOS build: skipped, training with {instead} "
        f"(same settings, 32-bit optimizer state) instead"
    )
