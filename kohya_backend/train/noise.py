"""Noise, timesteps, targets and the diffusion loss, with kohya's defaults (DDPM, 1000 steps, min-SNR)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from kohya_backend.errors import TrainingError

NUM_TRAIN_TIMESTEPS = 1000
PREDICTION_TYPES = ("epsilon", "v_prediction")


def normalize_prediction_type(prediction_type: str) -> str:
    """Return "epsilon" or "v_prediction" ("v" is accepted as the short form kohya's metadata uses)."""
    value = "v_prediction" if prediction_type == "v" else prediction_type
    if value not in PREDICTION_TYPES:
        raise TrainingError(
            f"unknown prediction type {prediction_type!r}",
            hint=f"use one of {', '.join(PREDICTION_TYPES)} (v_parameterization = true gives v_prediction)",
        )
    return value


def make_noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """DDPM schedule of SD training: 1000 steps, scaled_linear betas 0.00085..0.012, no sample clipping."""
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=normalize_prediction_type(prediction_type),
    )


def sample_noise(latents: Tensor, *, generator: torch.Generator | None, noise_offset: float | None) -> Tensor:
    """Gaussian noise shaped like `latents`, plus `noise_offset * randn(B, C, 1, 1)` when an offset is set."""
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        batch, channels = latents.shape[0], latents.shape[1]
        offset = randn_tensor(
            (batch, channels, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
        noise = noise + noise_offset * offset
    return noise


def sample_timesteps(
    batch_size: int,
    *,
    generator: torch.Generator | None,
    device: torch.device | str,
    min_timestep: int = 0,
    max_timestep: int = NUM_TRAIN_TIMESTEPS,
) -> Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep), one per sample, as int64 on `device`."""
    if not 0 <= min_timestep < max_timestep <= NUM_TRAIN_TIMESTEPS:
        raise TrainingError(
            f"timestep range [{min_timestep}, {max_timestep}) is empty or outside 0..{NUM_TRAIN_TIMESTEPS}",
            hint=f"set min_timestep < max_timestep, both within 0..{NUM_TRAIN_TIMESTEPS}",
        )
    gen_device = generator.device if generator is not None else torch.device(device)
    steps = torch.randint(
        min_timestep, max_timestep, (batch_size,), generator=generator, device=gen_device, dtype=torch.long
    )
    return steps.to(device)


def training_target(
    scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor, prediction_type: str
) -> Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    if normalize_prediction_type(prediction_type) == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def snr(scheduler: Any, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, float32 on the timesteps' device."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha_bar = alphas_cumprod[timesteps.long()]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(scheduler: Any, timesteps: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights: min(snr, gamma)/snr for epsilon, min(snr, gamma)/(snr + 1) for v."""
    values = snr(scheduler, timesteps)
    clipped = torch.clamp(values, max=gamma)
    if normalize_prediction_type(prediction_type) == "v_prediction":
        return clipped / (values + 1.0)
    return clipped / values


def diffusion_loss(
    pred: Tensor,
    target: Tensor,
    *,
    timesteps: Tensor,
    scheduler: Any,
    min_snr_gamma: float | None,
    prediction_type: str,
    sample_weights: Tensor | None = None,
) -> Tensor:
    """Scalar loss: float32 MSE averaged per sample, times sample weights (prior_loss_weight) and min-SNR."""
    per_element = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_element.mean(dim=tuple(range(1, per_element.ndim)))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(device=per_sample.device, dtype=torch.float32)
    if min_snr_gamma:
        weights = min_snr_weights(scheduler, timesteps, min_snr_gamma, prediction_type)
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()
