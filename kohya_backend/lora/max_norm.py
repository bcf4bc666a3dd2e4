"""Max-norm regularisation of LoRA weights (`scale_weight_norms`), as kohya's networks.lora
apply_max_norm_regularization: after each optimizer step, every module whose update up @ down * alpha/dim has a
Frobenius norm above the limit has both factors scaled by sqrt(limit / norm)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MaxNormStats:
    """What one max-norm pass did, as kohya logs it: keys scaled, mean and largest norm after scaling."""

    keys_scaled: int
    mean_norm: float
    max_norm: float

    def as_log(self) -> dict[str, float]:
        """kohya's TensorBoard names for these numbers."""
        return {
            "max_norm/keys_scaled": float(self.keys_scaled),
            "norm/avg_key_norm": self.mean_norm,
            "max_norm/max_key_norm": self.max_norm,
        }


def lora_update(down: Tensor, up: Tensor, alpha: float) -> Tensor:
    """The weight update of one kohya LoRA module, up @ down * alpha / dim, shaped like the wrapped weight.

    1x1 convs multiply the squeezed matrices; a 3x3 LoCon down projection is convolved with its 1x1 up projection.
    """
    dim = down.shape[0]
    if down.ndim == 4 and up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
        updown = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    elif down.ndim == 4:
        updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    else:
        updown = up @ down
    return updown * (alpha / dim)


def scale_lora_norms(modules: Iterable[tuple[Tensor, Tensor, Tensor]], max_norm: float) -> MaxNormStats:
    """Scale (down, up, alpha) triples in place so no update's norm exceeds `max_norm`; parameters change in place."""
    norms: list[float] = []
    scaled = 0
    with torch.no_grad():
        for down, up, alpha in modules:
            updown = lora_update(down.float(), up.float(), float(alpha))
            norm = updown.norm().clamp(min=max_norm / 2)
            ratio = float(torch.clamp(norm, max=max_norm) / norm)
            if ratio != 1:
                scaled += 1
                down.mul_(ratio**0.5)
                up.mul_(ratio**0.5)
            norms.append(float(updown.norm()) * ratio)
    if not norms:
        return MaxNormStats(0, 0.0, 0.0)
    return MaxNormStats(scaled, sum(norms) / len(norms), max(norms))
