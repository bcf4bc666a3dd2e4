"""oneDNN's fp32 matmul for frozen layers on the CPU computes what F.linear and F.conv2d compute."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.nn.grad import conv2d_input

from kohya_backend.models import cpu_kernels

pytestmark = pytest.mark.skipif(
    cpu_kernels._matmul_op() is None, reason="this torch has no oneDNN matmul: F.linear is used instead"
)


def test_onednn_takes_cpu_fp32_products_only_while_onednn_is_on() -> None:
    x = torch.randn(4, 8)
    assert cpu_kernels.onednn_matmul(x)
    assert not cpu_kernels.onednn_matmul(
        x.bfloat16()
    )  # bf16 goes through F.linear (oneDNN's bf16 gemm already)
    assert not cpu_kernels.onednn_matmul(x.to("meta"))
    with torch.backends.mkldnn.flags(enabled=False):
        assert not cpu_kernels.onednn_matmul(x)


@pytest.mark.parametrize("shape", [(77, 768), (2, 77, 768), (2, 4, 4, 768)])
def test_linear_and_its_input_gradient_match_torch(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    weight, bias = torch.randn(320, 768, generator=gen), torch.randn(320, generator=gen)
    out = cpu_kernels.linear(x, weight, bias)
    assert out.shape == (*shape[:-1], 320)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    grad = torch.randn(out.shape, generator=gen)
    torch.testing.assert_close(
        cpu_kernels.linear_input_grad(grad, weight), grad @ weight, rtol=1e-5, atol=1e-4
    )
    strided = x.transpose(0, -2) if x.dim() > 2 else x.t().contiguous().t()  # non-contiguous inputs too
    torch.testing.assert_close(
        cpu_kernels.linear(strided, weight, None), F.linear(strided, weight), rtol=1e-5, atol=1e-4
    )


def test_one_buffer_holding_different_weights_gives_each_ones_product() -> None:
    """Frozen layers upcast into one reused buffer: the matmul must not cache anything by the weight's address."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=gen)
    first, second = torch.randn(32, 64, generator=gen), torch.randn(32, 64, generator=gen)
    buffer = torch.empty(32 * 64).view(32, 64)
    with_first = cpu_kernels.linear(x, buffer.copy_(first), None)
    with_second = cpu_kernels.linear(x, buffer.copy_(second), None)
    torch.testing.assert_close(with_first, F.linear(x, first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_second, F.linear(x, second), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "size"), [(1, 1, 1, 8), (2, 1, 1, 9), (1, 2, 2, 7), (2, 0, 1, 4)]
)
def test_unfold_convolution_and_its_input_gradient_match_torch(
    stride: int, padding: int, dilation: int, size: int
) -> None:
    gen = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(24, 40, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 24, size, size, generator=gen)
    weight, bias = conv.weight.detach(), conv.bias.detach()
    out = cpu_kernels.unfold_conv2d(x, weight, bias, conv)
    reference = F.conv2d(x, weight, bias, stride, padding, dilation)
    assert out.is_contiguous() and out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grad = torch.randn(reference.shape, generator=gen)
    expected = conv2d_input(x.shape, weight, grad, stride, padding, dilation)
    got = cpu_kernels.unfold_conv2d_input_grad(x.shape, weight, grad, conv)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
