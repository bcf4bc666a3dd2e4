"""fp32 matrix products of frozen layers on the CPU through oneDNN's matmul instead of MKL's sgemm.

PyTorch computes an fp32 F.linear (and the im2col convolution path) with MKL's sgemm, which takes its AVX2 code
on AMD CPUs: about 90 GFLOP/s a core where oneDNN's matmul, which picks its kernels by instruction set, reaches
180-215 (measured on the 2-core AMD EPYC bench machine; bench/README.md). `torch.ops.mkldnn._linear_pointwise` is
that matmul on plain tensors (inductor's CPU linear): it is private, so its presence is checked once, and
without it everything goes through F.linear as before.

A convolution whose weight is too large for oneDNN's own convolution on a small map (it re-lays the weight out on
every call: models/frozen.py) is computed as unfold + that matmul, and its input gradient as that matmul + fold:
twice as fast as PyTorch's im2col path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F


@functools.cache
def _matmul_op() -> Callable[..., Tensor] | None:
    """oneDNN's linear on plain tensors, when this torch has it and oneDNN is built in."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op: Callable[..., Tensor] = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return op


def onednn_matmul(x: Tensor) -> bool:
    """Whether an fp32 product with `x` goes through oneDNN's matmul: a CPU fp32 tensor, oneDNN present and on."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and bool(torch.backends.mkldnn.enabled)
        and _matmul_op() is not None
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias), through oneDNN's matmul for CPU fp32 tensors (`weight` may be a transposed view)."""
    op = _matmul_op()
    if op is None or not onednn_matmul(x):
        return F.linear(x, weight, bias)
    return op(x, weight, bias, "none", [], "")


def linear_input_grad(grad: Tensor, weight: Tensor) -> Tensor:
    """The gradient of F.linear's input: grad @ weight."""
    if not onednn_matmul(grad):
        return grad.matmul(weight)
    return linear(grad, weight.t(), None)


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def unfold_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, conv: Any) -> Tensor:
    """F.conv2d (groups 1, int padding) as unfold + matmul; the result is contiguous NCHW."""
    batch, _, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    stride, padding, dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    out = linear(cols.transpose(1, 2), weight.reshape(out_channels, -1), bias)  # (N, L, O)
    out_h = _out_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = _out_size(width, kw, stride[1], padding[1], dilation[1])
    return out.transpose(1, 2).reshape(batch, out_channels, out_h, out_w).contiguous()


def unfold_conv2d_input_grad(shape: torch.Size, weight: Tensor, grad: Tensor, conv: Any) -> Tensor:
    """The input gradient of `unfold_conv2d` (= conv2d_input): matmul with the weight, then fold."""
    batch, out_channels, out_h, out_w = grad.shape
    flat = grad.reshape(batch, out_channels, out_h * out_w).transpose(1, 2)  # (N, L, O)
    cols = linear_input_grad(flat, weight.reshape(out_channels, -1))  # (N, L, C*kh*kw)
    return F.fold(
        cols.transpose(1, 2),
        tuple(shape[-2:]),
        tuple(weight.shape[-2:]),
        dilation=tuple(conv.dilation),
        padding=tuple(conv.padding),
        stride=tuple(conv.stride),
    )
