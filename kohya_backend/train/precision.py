"""Mixed precision for one run, driven by torch.amp directly: the device, the dtypes, autocast, and fp16 loss
scaling (scale -> backward -> unscale_ -> clip -> step -> update), so the optimizer always sees true gradients and
a step whose gradients overflowed is skipped.

No process-wide state: each run builds its own Precision, so runs in one process (tests, the demo) never disturb
each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from kohya_backend.train.device import DeviceFacts, DevicePlan, detect_facts, device_label, plan_device

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Precision:
    """Where and in which precision a run computes.

    `weight_dtype` is the dtype of the frozen weights, `autocast_dtype` the dtype autocast computes in (None: no
    autocast), `scaler` the fp16 loss scaler (None: gradients need no scaling).
    """

    device: torch.device
    weight_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    notes: tuple[
        str, ...
    ] = ()  # what this device does differently from what was asked (warnings for the log)
    label: str = "CPU"  # "CUDA", "ROCm", "MPS" or "CPU"

    @classmethod
    def from_plan(cls, plan: DevicePlan, *, label: str | None = None) -> Precision:
        """The precision of a device plan (train/device.py): frozen weights in the plan's dtype, autocast to its
        mixed precision, and fp16 loss scaling on a GPU (CUDA or MPS) with torch's defaults (initial scale 65536)."""
        dtype = DTYPES[plan.weight_dtype]
        autocast = DTYPES[plan.mixed_precision] if plan.mixed_precision != "no" else None
        scaler = (
            torch.amp.GradScaler(plan.kind) if plan.mixed_precision == "fp16" and plan.kind != "cpu" else None
        )
        return cls(torch.device(plan.kind), dtype, autocast, scaler, plan.notes, label or plan.label)

    @classmethod
    def for_run(cls, mixed_precision: str, *, device: str | None = None) -> Precision:
        """The precision kohya's mixed_precision gives on `device` ("cuda", "mps", "cpu"; default: the best this
        process has, or the one the job's runner named). fp16 needs a GPU: on the CPU it falls back to float32;
        bf16 on the CPU autocasts the compute to bf16 and keeps float32 weights."""
        if device is None:
            facts = detect_facts()
        else:
            kind = torch.device(device).type
            facts = DeviceFacts(cuda=kind == "cuda", mps=kind == "mps", forced=kind)
        plan = plan_device(mixed_precision, facts)
        return cls.from_plan(plan, label=device_label(plan, facts))

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the run's compute dtype (nothing when training in full precision)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`, multiplied by the loss scale under fp16 so small gradients do not underflow."""
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], max_grad_norm: float
    ) -> bool:
        """Unscale, clip to `max_grad_norm` (0: no clipping), step; returns False when the step was skipped.

        Under fp16 a step whose gradients hold inf/NaN is skipped and the loss scale halved (GradScaler's rule);
        the caller then leaves the learning-rate schedule where it is, as accelerate does.
        """
        scaler = self.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)  # the norm below and the optimizer see the true gradients
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params), max_grad_norm)
        if scaler is None:
            optimizer.step()
            return True
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        return scaler.get_scale() >= scale

    def state_dict(self) -> dict[str, Any] | None:
        """The loss scaler's state for a saved training state (None without a scaler)."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the loss scaler's state saved by `state_dict` (nothing to do without a scaler or a state)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
