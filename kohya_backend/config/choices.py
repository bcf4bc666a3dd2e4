"""The names kohya accepts for optimizers, schedules, samplers and network_args that this trainer implements:
one table each, read by the schema, the trainer and the sampler."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kohya_backend.config.lycoris_args import LYCORIS_MODULE
from kohya_backend.config.optimizers import BUILTIN_OPTIMIZERS

# kohya's own optimizer names; optimizer_type may also name a class (config/optimizers.py)
OPTIMIZERS: tuple[str, ...] = tuple(BUILTIN_OPTIMIZERS)
NETWORK_MODULES: tuple[str, ...] = ("networks.lora", LYCORIS_MODULE)
LOSS_TYPES: tuple[str, ...] = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES: tuple[str, ...] = ("snr", "exponential", "constant")
LR_SCHEDULERS: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "adafactor",
)
# The network_args this trainer implements for networks.lora (kohya's LoCon extension and its dropouts);
# lycoris.kohya reads its own (config/lycoris_args.py).
NETWORK_ARGS: tuple[str, ...] = ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout")
# kohya's block-wise network_args for networks.lora (learning rates, dims and alphas per U-Net block): the GUI passes
# them, this trainer does not implement them (config/validate.py says so).
BLOCK_WISE_ARGS: tuple[str, ...] = (
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
)


@dataclass(frozen=True)
class Sampler:
    """A kohya sampler name: the diffusers scheduler class that implements it and its extra settings.

    `option` False: kohya reads it in a prompt's --ss only, not as sample_sampler (ddpm).
    """

    scheduler: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    option: bool = True


_DPM_SOLVER = Sampler(
    "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}
)
SAMPLERS: Mapping[str, Sampler] = MappingProxyType(
    {
        "ddim": Sampler("DDIMScheduler"),
        "ddpm": Sampler("DDPMScheduler", option=False),
        "pndm": Sampler("PNDMScheduler"),
        "lms": Sampler("LMSDiscreteScheduler"),
        "euler": Sampler("EulerDiscreteScheduler"),
        "euler_a": Sampler("EulerAncestralDiscreteScheduler"),
        "heun": Sampler("HeunDiscreteScheduler"),
        "dpm_2": Sampler("KDPM2DiscreteScheduler"),
        "dpm_2_a": Sampler("KDPM2AncestralDiscreteScheduler"),
        "dpmsolver": _DPM_SOLVER,
        "dpmsolver++": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
        "dpmsingle": Sampler("DPMSolverSinglestepScheduler"),
        "k_lms": Sampler("LMSDiscreteScheduler"),
        "k_euler": Sampler("EulerDiscreteScheduler"),
        "k_euler_a": Sampler("EulerAncestralDiscreteScheduler"),
        "k_dpm_2": Sampler("KDPM2DiscreteScheduler"),
        "k_dpm_2_a": Sampler("KDPM2AncestralDiscreteScheduler"),
    }
)
SAMPLE_SAMPLER_CHOICES: tuple[str, ...] = tuple(name for name, s in SAMPLERS.items() if s.option)
