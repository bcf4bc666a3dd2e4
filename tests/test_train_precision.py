"""fp16 loss scaling on the CPU with an injected GradScaler: the optimizer sees true gradients, an overflowing step
is skipped and the scale halved, and the scaler's state survives save_state and resume."""

from __future__ import annotations

import math

import pytest
import torch

from kohya_backend.train.precision import Precision


def _scaled(init_scale: float = 1024.0) -> Precision:
    return Precision(torch.device("cpu"), scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def _param_and_optimizer() -> tuple[torch.nn.Parameter, torch.optim.Optimizer, list[torch.Tensor]]:
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    seen: list[torch.Tensor] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(param.grad.detach().clone()))
    return param, optimizer, seen


def test_a_gradient_of_2_reaches_the_optimizer_as_2() -> None:
    precision = _scaled(1024.0)
    param, optimizer, seen = _param_and_optimizer()
    precision.backward((2 * param).sum())
    assert torch.equal(param.grad, torch.full((3,), 2048.0))  # scaled for backward...
    assert precision.step(optimizer, [param], max_grad_norm=0.0)
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((3,), 2.0))  # ...and unscaled before the step
    assert torch.equal(param.detach(), torch.full((3,), -2.0))
    assert precision.scaler is not None and precision.scaler.get_scale() == 1024.0


def test_clipping_sees_the_unscaled_gradient() -> None:
    precision = _scaled(1024.0)
    param, optimizer, seen = _param_and_optimizer()
    precision.backward((torch.tensor([0.1, 0.2, 0.2]) * param).sum())  # norm 0.3: below the limit
    precision.step(optimizer, [param], max_grad_norm=1.0)
    torch.testing.assert_close(seen[0], torch.tensor([0.1, 0.2, 0.2]))


def test_an_overflowing_step_is_skipped_and_the_scale_halved() -> None:
    precision = _scaled(1024.0)
    param, optimizer, seen = _param_and_optimizer()
    precision.backward((param * torch.tensor([1.0, math.inf, 1.0])).sum())
    assert not precision.step(optimizer, [param], max_grad_norm=1.0)
    assert seen == [] and torch.equal(param.detach(), torch.zeros(3))
    assert precision.scaler is not None and precision.scaler.get_scale() == 512.0
    optimizer.zero_grad()
    precision.backward((2 * param).sum())
    assert precision.step(optimizer, [param], max_grad_norm=0.0)
    assert torch.equal(seen[0], torch.full((3,), 2.0))


def test_without_a_scaler_gradients_pass_unchanged() -> None:
    precision = Precision(torch.device("cpu"))
    param, optimizer, seen = _param_and_optimizer()
    precision.backward((2 * param).sum())
    assert precision.step(optimizer, [param], max_grad_norm=0.0) and torch.equal(
        seen[0], torch.full((3,), 2.0)
    )
    assert precision.state_dict() is None


def test_fp16_falls_back_to_float32_on_the_cpu_and_bf16_autocasts() -> None:
    fp16 = Precision.for_run("fp16", device="cpu")
    assert fp16.scaler is None and fp16.autocast_dtype is None and fp16.weight_dtype == torch.float32
    bf16 = Precision.for_run("bf16", device="cpu")
    assert bf16.weight_dtype == torch.float32 and bf16.autocast_dtype == torch.bfloat16
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_scales_the_loss() -> None:
    precision = Precision.for_run("fp16", device="cuda")
    assert precision.scaler is not None and precision.scaler.get_scale() == 65536.0
    assert precision.weight_dtype == torch.float16
