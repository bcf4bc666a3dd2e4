"""Loss functions and per-sample loss weights of kohya's training options, as pure functions of tensors.

Formulas checked against sd-scripts: `library/train_util.py` (get_huber_threshold_if_needed, conditional_loss) and
`library/custom_train_functions.py` (apply_snr_weight, scale_v_prediction_loss_like_noise_prediction,
add_v_prediction_like_loss, apply_debiased_estimation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kohya_backend.config.schema import HUBER_SCHEDULES, LOSS_TYPES
from kohya_backend.errors import TrainingError

SNR_CAP = 1000.0  # kohya caps the SNR at 1000 where it divides by it (timestep 0 would be near infinite)


@dataclass(frozen=True)
class LossSettings:
    """The loss options of one run (kohya's argument names and defaults)."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    @property
    def uses_huber_c(self) -> bool:
        """Whether the loss type needs a Huber threshold per sample."""
        return self.loss_type in ("huber", "smooth_l1")

    @property
    def weights_by_snr(self) -> bool:
        """Whether any SNR-based weight beyond min-SNR is on."""
        return bool(
            self.scale_v_pred_loss_like_noise_pred or self.v_pred_like_loss or self.debiased_estimation_loss
        )


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TrainingError(f"unknown {name} {value!r}", hint=f"use one of {', '.join(allowed)}")


def huber_threshold(
    timesteps: Tensor,
    *,
    schedule: str,
    huber_c: float,
    huber_scale: float,
    alphas_cumprod: Tensor,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """Per-sample Huber threshold c(t), float32 on the timesteps' device.

    exponential: exp(ln(huber_c) * t / T) * huber_scale; snr: (1 - c) / (1 + sigma_t)^2 + c with
    sigma_t = sqrt((1 - alpha_bar) / alpha_bar) (no huber_scale, as kohya); constant: huber_c * huber_scale.
    """
    _check_choice("huber_schedule", schedule, HUBER_SCHEDULES)
    t = timesteps.to(torch.float32)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * t) * huber_scale
    if schedule == "snr":
        alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
        sigmas = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    return torch.full_like(t, huber_c * huber_scale)


def elementwise_loss(pred: Tensor, target: Tensor, loss_type: str, huber_c: Tensor | None = None) -> Tensor:
    """Unreduced loss in float32: L2 (squared error), L1, pseudo-Huber 2c(sqrt(d^2 + c^2) - c) or smooth L1
    2(sqrt(d^2 + c^2) - c), with one threshold c per sample."""
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(pred, target, reduction="none")
    if huber_c is None:
        raise TrainingError(f"loss_type {loss_type} needs a Huber threshold per sample")
    c = huber_c.to(device=pred.device, dtype=torch.float32).view(-1, *([1] * (pred.ndim - 1)))
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if loss_type == "huber" else 2 * root


def snr_scale(snr: Tensor) -> Tensor:
    """snr / (snr + 1) with the SNR capped at 1000: the factor between v-prediction and noise-prediction losses."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return capped / (capped + 1)


def debiased_weights(snr: Tensor, *, v_prediction: bool) -> Tensor:
    """Debiased estimation loss weights: 1/sqrt(snr) (noise prediction) or 1/(snr + 1) (v), SNR capped at 1000."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return 1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped)


def post_process_loss(
    per_sample: Tensor, snr: Tensor, settings: LossSettings, *, v_prediction: bool
) -> Tensor:
    """kohya's loss weights after min-SNR, in its order: v-prediction scaled like noise prediction, the
    v-prediction-like term added (loss + loss / scale * v_pred_like_loss), then debiased estimation."""
    snr = snr.to(device=per_sample.device, dtype=torch.float32)
    if settings.scale_v_pred_loss_like_noise_pred:
        per_sample = per_sample * snr_scale(snr)
    if settings.v_pred_like_loss:
        per_sample = per_sample + per_sample / snr_scale(snr) * settings.v_pred_like_loss
    if settings.debiased_estimation_loss:
        per_sample = per_sample * debiased_weights(snr, v_prediction=v_prediction)
    return per_sample
