"""Frozen base-model Linear/Conv2d layers computed lean: the same numbers for less memory and time.

A frozen layer never needs the gradient of its weight, only that of its input. Routed through the functions
here, a layer
- saves only its weight for the backward pass, not its input (which autograd keeps for the weight gradient);
- may keep its weight in the checkpoint's lower precision (fp16/bf16) and upcast it to the compute dtype as it
  runs, again in backward: an fp16 value upcast is exact, so an fp16 SDXL file trains in fp32 with the numbers a
  fully upcast model gives, from 6.9 GB of weights instead of 13.9 GB and with no load-time copy. The upcast copy
  is written into one reusable buffer per thread: a fresh allocation would be page-faulted in anew on every call
  for the weights over glibc's 32 MiB mmap threshold (SD's 1280-channel convolutions and feed-forwards), which
  made an fp16 file's steps 40% slower than an fp32 file's (1.06x with the buffer);
- computes in autocast's dtype when autocast is on (CPU bf16), so weights stored in bf16 are used as they are;
- on the CPU in fp32, multiplies through oneDNN's matmul rather than MKL's sgemm (twice as fast on AMD CPUs), and
  convolves 16x16 and smaller maps with weights over 32 MiB as unfold + that matmul: oneDNN's convolution re-lays
  out the weight on every call into a fresh block that glibc mmaps, which there costs more than the convolution
  itself (models/cpu_kernels.py; _conv_path says when).

Hand-written: diffusers' layerwise casting is built for inference (autograd keeps every upcast weight alive for
the backward pass) and neither diffusers nor transformers drops the saved inputs of frozen layers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_input

from kohya_backend.errors import ModelError
from kohya_backend.models import cpu_kernels

_LOWER = (torch.float16, torch.bfloat16)
SMALL_MAP = 16  # side at or below which CPU convolutions of large weights leave oneDNN's convolution
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest mmap threshold (train/runtime.tune_allocator sets it)


def _conv_path(x: Tensor, weight: Tensor, dtype: torch.dtype, conv: nn.Conv2d) -> str:
    """How a frozen convolution runs: "onednn" (F.conv2d), "unfold" (unfold + oneDNN's matmul) or "im2col".

    oneDNN's convolution re-lays its weight out into a fresh block on every call; for a weight whose fp32 copy
    reaches glibc's 32 MiB mmap threshold (SD's 1280-channel 3x3 convolutions) that block is mmap-ed, page-faulted
    in and zeroed anew each time, which on a map of 16x16 or smaller costs more than the convolution (a
    1280-channel one on an 8x8 map runs at 40% of its speed). Those take unfold + oneDNN's matmul instead, which
    uses the weight as it is (models/cpu_kernels.py; PyTorch's own im2col path, with MKL's slower sgemm, when that
    matmul is missing). Only in fp32 on the CPU: oneDNN's bf16 convolution is the fast one, and the im2col path has
    no bf16 kernel at all (50-500x slower).
    """
    if not (
        x.device.type == "cpu"
        and dtype == torch.float32
        and conv.groups == 1
        and tuple(weight.shape[-2:]) != (1, 1)
        and min(x.shape[-2:]) <= SMALL_MAP
        and weight.numel() * 4 >= MMAP_THRESHOLD
    ):
        return "onednn"
    return "unfold" if cpu_kernels.onednn_matmul(x.to(dtype)) else "im2col"


class _Buffers(threading.local):
    """Per thread: one reusable buffer per (device, dtype) that receives upcast weights."""

    def __init__(self) -> None:
        self.by_kind: dict[tuple[torch.device, torch.dtype], Tensor] = {}


_BUFFERS = _Buffers()


def _upcast(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """`weight` in `dtype`: itself when it already is, else a copy in this thread's reusable buffer.

    The copy is only valid until the next call on this thread: use it at once, never save it for backward.
    """
    if weight.dtype == dtype:
        return weight
    key = (weight.device, dtype)
    buffer = _BUFFERS.by_kind.get(key)
    if buffer is None or buffer.numel() < weight.numel():
        _BUFFERS.by_kind.pop(key, None)  # the smaller buffer goes before the larger one is allocated
        buffer = torch.empty(weight.numel(), dtype=dtype, device=weight.device)
        _BUFFERS.by_kind[key] = buffer
    return buffer[: weight.numel()].view(weight.shape).copy_(weight)


def release_upcast_buffers() -> None:
    """Drop this thread's upcast buffers (the largest frozen weight's size each) once no routed layer runs."""
    _BUFFERS.by_kind.clear()


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a frozen layer computes in: autocast's when it is on for the input's device, else the input's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


@contextlib.contextmanager
def _without_onednn(active: bool) -> Iterator[None]:
    """Turn oneDNN convolutions off for the block when `active` (torch's own flags() also resets other flags)."""
    if not active or not torch.backends.mkldnn.enabled:
        yield
        return
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True  # type: ignore[assignment]


class _FrozenLinear(torch.autograd.Function):
    """F.linear with a frozen weight (upcast to the compute dtype); backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        dtype = _compute_dtype(x)
        b = None if bias is None else bias.to(dtype)
        return cpu_kernels.linear(x.to(dtype), _upcast(weight, dtype), b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        return cpu_kernels.linear_input_grad(grad, _upcast(weight, grad.dtype)).to(ctx.x_dtype), None, None


class _FrozenConv2d(torch.autograd.Function):
    """F.conv2d with a frozen weight (upcast to the compute dtype); backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> Tensor:
        ctx.save_for_backward(weight)
        dtype = _compute_dtype(x)
        path = _conv_path(x, weight, dtype, conv)
        ctx.x_meta = (x.shape, x.dtype, path)
        ctx.conv = conv
        b = None if bias is None else bias.to(dtype)
        x, w = x.to(dtype), _upcast(weight, dtype)
        if path == "unfold":
            return cpu_kernels.unfold_conv2d(x, w, b, conv)
        with _without_onednn(path == "im2col"):
            return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        shape, dtype, path = ctx.x_meta
        conv = ctx.conv
        w = _upcast(weight, grad.dtype)
        if path == "unfold":
            return cpu_kernels.unfold_conv2d_input_grad(shape, w, grad, conv).to(dtype), None, None, None
        with _without_onednn(path == "im2col"):
            grad_x = conv2d_input(shape, w, grad, conv.stride, conv.padding, conv.dilation, conv.groups)
        return grad_x.to(dtype), None, None, None


def _check_frozen(module: nn.Module) -> None:
    if module.weight.requires_grad:
        raise ModelError(
            f"a frozen {type(module).__name__} of the base model was made trainable",
            hint="the base model's layers stay frozen; LoRA trains its own weights beside them",
        )


def _linear_forward(module: nn.Linear, x: Tensor) -> Tensor:
    _check_frozen(module)
    return _FrozenLinear.apply(x, module.weight, module.bias)  # type: ignore[no-any-return]


def _conv_forward(module: nn.Conv2d, x: Tensor) -> Tensor:
    _check_frozen(module)
    return _FrozenConv2d.apply(x, module.weight, module.bias, module)  # type: ignore[no-any-return]


def _routable(layer: nn.Module) -> bool:
    # exact classes (LoRA's own layers are separate modules); other padding modes and "same"/"valid" are not
    # handled by the input-gradient function
    if type(layer) is nn.Linear:
        return True
    return type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def frozen_weight_dtypes(
    module: nn.Module,
    state: dict[str, Tensor],
    dtype: torch.dtype,
    *,
    keep_file_precision: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, torch.dtype]:
    """For an fp32 run (`dtype`), the routable weights of `module` to store in another dtype, and that dtype.

    With `compute_dtype` (bf16 under CPU autocast) every routable weight is stored in it: autocast would round it to
    that dtype on every call anyway. With `keep_file_precision`, weights `state` holds in fp16/bf16 keep it (their
    layers upcast them exactly as they run). The module's first parameter is never among them: diffusers and
    transformers report a model's dtype as its first parameter's, and pipelines cast their inputs to it.
    """
    if dtype != torch.float32 or not (keep_file_precision or compute_dtype is not None):
        return {}
    first = next((name for name, _ in module.named_parameters()), None)
    chosen: dict[str, torch.dtype] = {}
    for name, layer in module.named_modules():
        key = f"{name}.weight" if name else "weight"
        tensor = state.get(key)
        if not _routable(layer) or key == first or tensor is None:
            continue
        if compute_dtype is not None and compute_dtype != dtype:
            chosen[key] = compute_dtype
        elif keep_file_precision and tensor.dtype in _LOWER:
            chosen[key] = tensor.dtype
    return chosen


def route_frozen_layers(module: nn.Module, only: set[str] | None = None) -> int:
    """Route frozen Linear/Conv2d layers of `module` (those whose weight key is in `only`, when given) through
    the lean functions; returns how many are routed now. Call before a LoRA wraps them; a layer whose forward is
    already replaced (routed, or wrapped) is left as it is."""
    routed = 0
    for name, layer in module.named_modules():
        if not _routable(layer) or (only is not None and f"{name}.weight" not in only):
            continue
        if "forward" in layer.__dict__:
            continue  # routed already, or wrapped by someone else (a LoRA): left as it is
        forward = _linear_forward if isinstance(layer, nn.Linear) else _conv_forward
        layer.forward = forward.__get__(layer)  # type: ignore[attr-defined, method-assign]
        routed += 1
    return routed
