"""Noise, timesteps, targets, SNR weights and the loss, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from kohya_backend.errors import TrainingError
from kohya_backend.train.noise import (
    diffusion_loss,
    make_noise_scheduler,
    min_snr_weights,
    sample_noise,
    sample_timesteps,
    snr,
    training_target,
)


def _alpha_bar(t: int) -> float:
    """DDPM scaled_linear schedule by hand: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2."""
    start, end = math.sqrt(0.00085), math.sqrt(0.012)
    product = 1.0
    for i in range(t + 1):
        beta = (start + (end - start) * i / 999) ** 2
        product *= 1.0 - beta
    return product


def test_noise_scheduler_matches_sd_training_schedule() -> None:
    sched = make_noise_scheduler()
    assert sched.config.num_train_timesteps == 1000
    assert sched.config.clip_sample is False
    assert sched.config.prediction_type == "epsilon"
    assert sched.betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert sched.betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    assert sched.alphas_cumprod[500].item() == pytest.approx(_alpha_bar(500), rel=1e-4)
    assert make_noise_scheduler("v").config.prediction_type == "v_prediction"
    assert make_noise_scheduler("v_prediction").config.prediction_type == "v_prediction"
    with pytest.raises(TrainingError, match="unknown prediction type"):
        make_noise_scheduler("sample")


def test_sample_noise_is_reproducible_and_offset_is_per_channel() -> None:
    latents = torch.zeros(2, 4, 8, 8)
    plain = sample_noise(latents, generator=torch.Generator().manual_seed(1), noise_offset=None)
    again = sample_noise(latents, generator=torch.Generator().manual_seed(1), noise_offset=0.0)
    assert plain.shape == latents.shape
    assert torch.equal(plain, again)
    offset = sample_noise(latents, generator=torch.Generator().manual_seed(1), noise_offset=0.1)
    diff = offset - plain
    # the offset is one random value per (sample, channel), the same at every pixel
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    torch.randn(latents.shape, generator=gen)  # the base noise is drawn first, then the offset
    expected = 0.1 * torch.randn(2, 4, 1, 1, generator=gen)
    assert torch.allclose(diff[:, :, :1, :1], expected, atol=1e-6)


def test_sample_timesteps_range_dtype_and_errors() -> None:
    steps = sample_timesteps(512, generator=torch.Generator().manual_seed(0), device="cpu")
    assert steps.dtype == torch.long and steps.shape == (512,)
    assert int(steps.min()) >= 0 and int(steps.max()) < 1000
    narrow = sample_timesteps(256, generator=None, device="cpu", min_timestep=100, max_timestep=200)
    assert int(narrow.min()) >= 100 and int(narrow.max()) < 200
    one = sample_timesteps(4, generator=torch.Generator().manual_seed(3), device="cpu")
    two = sample_timesteps(4, generator=torch.Generator().manual_seed(3), device="cpu")
    assert torch.equal(one, two)
    with pytest.raises(TrainingError, match="timestep range"):
        sample_timesteps(1, generator=None, device="cpu", min_timestep=500, max_timestep=500)


def test_training_target_epsilon_and_velocity() -> None:
    sched = make_noise_scheduler("v_prediction")
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 900])
    assert torch.equal(training_target(sched, latents, noise, timesteps, "epsilon"), noise)
    velocity = training_target(sched, latents, noise, timesteps, "v_prediction")
    for i, t in enumerate((10, 900)):
        ab = _alpha_bar(t)
        expected = math.sqrt(ab) * noise[i] - math.sqrt(1 - ab) * latents[i]
        assert torch.allclose(velocity[i], expected, atol=1e-4)


def test_snr_matches_hand_computation() -> None:
    sched = make_noise_scheduler()
    values = snr(sched, torch.tensor([0, 250, 999]))
    for value, t in zip(values.tolist(), (0, 250, 999)):
        ab = _alpha_bar(t)
        assert value == pytest.approx(ab / (1 - ab), rel=1e-4)
    assert values.dtype == torch.float32


def test_min_snr_weights_epsilon_and_v() -> None:
    sched = make_noise_scheduler()
    timesteps = torch.tensor([5, 400, 950])
    gamma = 5.0
    eps = min_snr_weights(sched, timesteps, gamma, "epsilon").tolist()
    vel = min_snr_weights(sched, timesteps, gamma, "v_prediction").tolist()
    for e, v, t in zip(eps, vel, (5, 400, 950)):
        s = _alpha_bar(t) / (1 - _alpha_bar(t))
        assert e == pytest.approx(min(s, gamma) / s, rel=1e-4)
        assert v == pytest.approx(min(s, gamma) / (s + 1), rel=1e-4)
    assert eps[0] < 1.0  # a low timestep has snr > gamma and is down-weighted
    assert eps[2] == pytest.approx(1.0)  # a high timestep has snr < gamma: weight 1 for epsilon


def test_diffusion_loss_per_sample_weights_and_min_snr() -> None:
    sched = make_noise_scheduler()
    pred = torch.zeros(2, 1, 2, 2, dtype=torch.float16)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    timesteps = torch.tensor([5, 950])
    plain = diffusion_loss(
        pred, target, timesteps=timesteps, scheduler=sched, min_snr_gamma=None, prediction_type="epsilon"
    )
    assert plain.dtype == torch.float32 and plain.ndim == 0
    assert plain.item() == pytest.approx((1.0 + 4.0) / 2)
    weighted = diffusion_loss(
        pred,
        target,
        timesteps=timesteps,
        scheduler=sched,
        min_snr_gamma=None,
        prediction_type="epsilon",
        sample_weights=torch.tensor([1.0, 0.5]),
    )
    assert weighted.item() == pytest.approx((1.0 + 4.0 * 0.5) / 2)
    snr_loss = diffusion_loss(
        pred, target, timesteps=timesteps, scheduler=sched, min_snr_gamma=5.0, prediction_type="epsilon"
    )
    w = min_snr_weights(sched, timesteps, 5.0, "epsilon").tolist()
    assert snr_loss.item() == pytest.approx((1.0 * w[0] + 4.0 * w[1]) / 2, rel=1e-5)
