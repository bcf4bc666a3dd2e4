"""Noise, timesteps, targets and the diffusion loss, with kohya's defaults (DDPM, 1000 steps, min-SNR) and the noise
variants kohya's presets use (offset with random strength and adaptive scale, multires/pyramid noise, input
perturbation, zero terminal SNR); formulas checked against sd-scripts' `library/custom_train_functions.py` and
`library/train_util.py` (get_noise_noisy_latents_and_timesteps)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from kohya_backend.errors import TrainingError
from kohya_backend.train.losses import LossSettings, elementwise_loss, huber_threshold, post_process_loss

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


def zero_terminal_snr_betas(betas: Tensor) -> Tensor:
    """Betas rescaled so the last timestep has zero SNR (arXiv 2305.08891), as kohya's
    fix_noise_scheduler_betas_for_zero_terminal_snr: sqrt(alpha_bar) shifted to end at 0, scaled to keep its start."""
    alphas_bar_sqrt = (1.0 - betas).cumprod(0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def make_noise_scheduler(
    prediction_type: str = "epsilon", *, zero_terminal_snr: bool = False
) -> DDPMScheduler:
    """DDPM schedule of SD training: 1000 steps, scaled_linear betas 0.00085..0.012, no sample clipping.

    `all_snr` holds the SNR of the schedule before any zero-terminal-SNR fix, as kohya computes it once
    (prepare_scheduler_for_custom_training) and uses it for min-SNR, debiased and v-prediction-like weights.
    """
    scheduler: Any = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=normalize_prediction_type(prediction_type),
    )
    alphas_cumprod = scheduler.alphas_cumprod.float()
    scheduler.all_snr = alphas_cumprod / (1.0 - alphas_cumprod)  # type: ignore[attr-defined]
    if zero_terminal_snr:
        scheduler.betas = zero_terminal_snr_betas(scheduler.betas)
        scheduler.alphas = 1.0 - scheduler.betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    return randn_tensor(shape, generator=generator, device=like.device, dtype=like.dtype)


def _rand(generator: torch.Generator | None, like: Tensor) -> Tensor:
    """One uniform [0, 1) draw from `generator`, as a 1-element tensor beside `like`."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(1, generator=generator, device=gen_device).to(device=like.device, dtype=like.dtype)


def pyramid_noise(
    noise: Tensor, *, generator: torch.Generator | None, iterations: int, discount: float
) -> Tensor:
    """Multires noise (kohya's pyramid_noise_like): add upsampled noise drawn at sizes shrinking by a random factor
    r in [2, 4) per level, weighted discount**i, stopping at 1 pixel; then rescale to unit standard deviation."""
    batch, channels, height, width = noise.shape
    upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
    out = noise.clone()
    for i in range(iterations):
        r = float(_rand(generator, noise)) * 2 + 2
        h, w = max(1, int(height / (r**i))), max(1, int(width / (r**i)))
        out = out + upsample(_randn((batch, channels, h, w), generator, noise)) * discount**i
        if h == 1 or w == 1:
            break
    return out / out.std()


def sample_noise(
    latents: Tensor,
    *,
    generator: torch.Generator | None,
    noise_offset: float | None,
    noise_offset_random_strength: bool = False,
    adaptive_noise_scale: float | None = None,
    multires_iterations: int | None = None,
    multires_discount: float = 0.3,
) -> Tensor:
    """Gaussian noise shaped like `latents`, with kohya's variants in kohya's order.

    Noise offset adds `offset * randn(B, C, 1, 1)`; with random strength the offset is `rand() * noise_offset`;
    an adaptive scale adds `adaptive_noise_scale * |per-channel latent mean|` to it (clamped at 0). Multires noise
    (`multires_iterations`) is applied after the offset, as in sd-scripts.
    """
    noise = _randn(tuple(latents.shape), generator, latents)
    if noise_offset:
        offset: float | Tensor = noise_offset
        if noise_offset_random_strength:
            offset = _rand(generator, latents) * noise_offset
        if adaptive_noise_scale:
            latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
            offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
        batch, channels = latents.shape[0], latents.shape[1]
        noise = noise + offset * _randn((batch, channels, 1, 1), generator, latents)
    if multires_iterations:
        noise = pyramid_noise(
            noise, generator=generator, iterations=multires_iterations, discount=multires_discount
        )
    return noise


def input_perturbation(
    noise: Tensor, *, generator: torch.Generator | None, gamma: float | None, random_strength: bool = False
) -> Tensor:
    """The noise that goes into the noisy latents with input perturbation (ip_noise_gamma, arXiv 2301.11706):
    `noise + gamma * randn_like(noise)` (gamma scaled by rand() with random strength); the target keeps `noise`."""
    if not gamma:
        return noise
    strength: float | Tensor = gamma
    if random_strength:
        strength = _rand(generator, noise) * gamma
    return noise + strength * _randn(tuple(noise.shape), generator, noise)


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
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, float32 on the timesteps' device.

    Taken from the scheduler's `all_snr` (the schedule before a zero-terminal-SNR fix, as kohya) when it has one.
    """
    table = getattr(scheduler, "all_snr", None)
    if table is not None:
        return table.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
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
    settings: LossSettings | None = None,
) -> Tensor:
    """Scalar loss as kohya's train_network: the loss type (L2 by default) in float32 averaged per sample, times
    sample weights (prior_loss_weight), min-SNR and the other SNR-based weights of `settings`."""
    settings = settings or LossSettings()
    huber_c = None
    if settings.uses_huber_c:
        huber_c = huber_threshold(
            timesteps,
            schedule=settings.huber_schedule,
            huber_c=settings.huber_c,
            huber_scale=settings.huber_scale,
            alphas_cumprod=scheduler.alphas_cumprod,
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
        )
    per_element = elementwise_loss(pred, target, settings.loss_type, huber_c)
    per_sample = per_element.mean(dim=tuple(range(1, per_element.ndim)))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(device=per_sample.device, dtype=torch.float32)
    if min_snr_gamma:
        weights = min_snr_weights(scheduler, timesteps, min_snr_gamma, prediction_type)
        per_sample = per_sample * weights.to(per_sample.device)
    if settings.weights_by_snr:
        v_prediction = normalize_prediction_type(prediction_type) == "v_prediction"
        per_sample = post_process_loss(
            per_sample, snr(scheduler, timesteps), settings, v_prediction=v_prediction
        )
    return per_sample.mean()
