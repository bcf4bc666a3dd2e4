"""Frozen Linear/Conv2d weights kept in the checkpoint's lower precision and computed in the run's.

An fp16 checkpoint trained in fp32 (mixed_precision "no", as on the CPU) needs no fp32 copy of its frozen
weights: the upcast of an fp16 value is exact, so upcasting each weight as its layer runs gives the very numbers
a fully upcast model gives, from half the memory (SDXL: 6.9 GB of weights instead of 13.9 GB) and without the
load-time copy. The weights stay memory-mapped from the file.

Hand-written: diffusers' layerwise casting is built for inference (the upcast weights autograd saves for the
backward pass stay alive, so training keeps every fp32 copy), and transformers has none. Here the backward pass
upcasts again instead of saving the fp32 weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_input

from kohya_backend.errors import ModelError

_LOWER = (torch.float16, torch.bfloat16)


class _UpcastLinear(torch.autograd.Function):
    """F.linear with a frozen low-precision weight upcast to the input's dtype, again in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight.to(grad.dtype)).to(ctx.x_dtype), None, None


class _UpcastConv2d(torch.autograd.Function):
    """F.conv2d with a frozen low-precision weight upcast to the input's dtype, again in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.conv = conv
        return F.conv2d(
            x,
            weight.to(x.dtype),
            None if bias is None else bias.to(x.dtype),
            conv.stride,
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,
            conv.groups,
        )

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        shape, dtype = ctx.x_meta
        conv = ctx.conv
        grad_x = conv2d_input(
            shape, weight.to(grad.dtype), grad, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        return grad_x.to(dtype), None, None, None


def _frozen(module: nn.Module) -> None:
    if module.weight.requires_grad:
        raise ModelError(
            f"a {type(module).__name__} kept in its file's precision was made trainable",
            hint="only frozen base-model layers may keep the checkpoint's precision; LoRA weights are separate",
        )


def _linear_forward(module: nn.Linear, x: Tensor) -> Tensor:
    _frozen(module)
    return _UpcastLinear.apply(x, module.weight, module.bias)  # type: ignore[no-any-return]


def _conv_forward(module: nn.Conv2d, x: Tensor) -> Tensor:
    _frozen(module)
    return _UpcastConv2d.apply(x, module.weight, module.bias, module)  # type: ignore[no-any-return]


def low_precision_weights(module: nn.Module, state: dict[str, Tensor], dtype: torch.dtype) -> set[str]:
    """Keys of `state` to keep in their stored precision: Linear/Conv2d weights stored below `dtype`.

    The module's first parameter is never among them: diffusers and transformers report a model's dtype as its
    first parameter's, and pipelines cast their inputs to it.
    """
    if dtype != torch.float32:
        return set()
    first = next((name for name, _ in module.named_parameters()), None)
    keys = set()
    for name, layer in module.named_modules():
        key = f"{name}.weight" if name else "weight"
        if type(layer) not in (nn.Linear, nn.Conv2d) or key == first:
            continue
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            continue
        tensor = state.get(key)
        if tensor is not None and tensor.dtype in _LOWER:
            keys.add(key)
    return keys


def compute_in_input_precision(module: nn.Module, keys: set[str]) -> int:
    """Route the forward of each layer whose weight key is in `keys` through the upcasting functions; returns
    how many layers were routed. Call after the weights are loaded."""
    routed = 0
    for name, layer in module.named_modules():
        if (f"{name}.weight" if name else "weight") not in keys:
            continue
        forward = _linear_forward if isinstance(layer, nn.Linear) else _conv_forward
        layer.forward = forward.__get__(layer)  # type: ignore[attr-defined, method-assign]
        routed += 1
    return routed
