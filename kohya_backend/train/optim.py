"""Optimizers and learning-rate schedulers by kohya's names, with kohya's argument handling."""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from kohya_backend.config.choices import LR_SCHEDULERS, OPTIMIZERS
from kohya_backend.config.optimizers import is_schedule_free, resolve_optimizer
from kohya_backend.config.train_config import TrainConfig
from kohya_backend.errors import ConfigError, ConfigIssue, OptimizerUnavailableError, TrainingError

logger = logging.getLogger(__name__)

OPTIMIZER_NAMES: tuple[str, ...] = OPTIMIZERS  # one list, kept by the config schema
LR_SCHEDULER_NAMES: tuple[str, ...] = LR_SCHEDULERS
_ADAFACTOR_INITIAL_LR = "kohya_initial_lr"


def _issue(key: str, message: str, hint: str | None = None) -> ConfigError:
    return ConfigError([ConfigIssue(message=message, key=key, hint=hint)])


def canonical_optimizer_name(name: str) -> str:
    """Return the canonical spelling of an optimizer name (kohya matches them case-insensitively); a class
    (a torch.optim name or an allowed import path, as kohya accepts) is returned as given."""
    by_lower = {n.lower(): n for n in OPTIMIZER_NAMES}
    found = by_lower.get(name.strip().lower())
    if found is None:
        ref, problem = resolve_optimizer(name)
        if ref is not None:
            return name.strip()
        if "." in name:
            raise _issue(
                "optimizer_type", problem or f"unknown optimizer {name!r}", "e.g. pytorch_optimizer.CAME"
            )
        close = difflib.get_close_matches(name, OPTIMIZER_NAMES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise _issue(
            "optimizer_type", f"unknown optimizer {name!r}", f"{hint}supported: {', '.join(OPTIMIZER_NAMES)}"
        )
    return found


def _accepted_args(cls: Any) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return sorted(
        n for n, p in params.items() if n not in ("self", "params", "lr") and p.kind is not p.VAR_KEYWORD
    )


def construct_optimizer(
    cls: Any, name: str, groups: list[dict], kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    """Build `cls` over param groups; an argument the class does not take names the ones it does."""
    takes_any = any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values()
    )
    unknown = [k for k in kwargs if k != "lr" and k not in _accepted_args(cls)]
    if unknown and not takes_any:
        raise _issue(
            "optimizer_args",
            f"{name} does not take {', '.join(sorted(unknown))}",
            f"{name} accepts: {', '.join(_accepted_args(cls))}",
        )
    try:
        return cls(groups, **kwargs)
    except (ValueError, TypeError) as exc:
        raise _issue(
            "optimizer_args",
            f"{name} rejected its settings: {exc}",
            "check learning rates and optimizer_args",
        ) from exc


def _adamw(groups: list[dict], lr: float, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    return construct_optimizer(torch.optim.AdamW, "AdamW", groups, {"lr": lr, **kwargs})


def _adamw8bit(
    groups: list[dict], lr: float, kwargs: dict[str, Any], *, dry_run: bool = False
) -> torch.optim.Optimizer:
    hint = 'install a bitsandbytes build that matches your CUDA, or set optimizer_type = "AdamW"'
    try:
        import bitsandbytes as bnb
    except Exception as exc:
        raise OptimizerUnavailableError(
            f"AdamW8bit needs bitsandbytes, which cannot be loaded: {exc}", hint
        ) from exc
    on_cpu = any(p.device.type == "cpu" for g in groups for p in g["params"])
    if on_cpu and not dry_run:
        from kohya_backend.train.optimizers_extra import bnb_cpu_problem

        problem = bnb_cpu_problem("AdamW8bit")
        if problem is not None:
            raise OptimizerUnavailableError(
                f"AdamW8bit cannot run on CPU with this bitsandbytes ({problem})",
                'train on a CUDA GPU, or set optimizer_type = "AdamW"',
            )
    return construct_optimizer(bnb.optim.AdamW8bit, "AdamW8bit", groups, {"lr": lr, **kwargs})


def _lion(groups: list[dict], lr: float, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        from lion_pytorch import Lion
    except ImportError as exc:
        raise OptimizerUnavailableError(
            "Lion needs the lion-pytorch package", "pip install lion-pytorch"
        ) from exc
    return construct_optimizer(Lion, "Lion", groups, {"lr": lr, **kwargs})


def _prodigy(groups: list[dict], lr: float, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        from prodigyopt import Prodigy
    except ImportError as exc:
        raise OptimizerUnavailableError(
            "Prodigy needs the prodigyopt package", "pip install prodigyopt"
        ) from exc
    lrs = {g.get("lr", lr) for g in groups} - {0.0}
    if len(lrs) > 1:
        # kohya warns and trains: Prodigy shares one step-size estimate d and scales it by each group's rate
        logger.warning("Prodigy with different learning rates per part: %s", sorted(lrs))
    return construct_optimizer(Prodigy, "Prodigy", groups, {"lr": lr, **kwargs})


def _adafactor(groups: list[dict], lr: float, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: relative_step set to True because warmup_init is True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return construct_optimizer(Adafactor, "Adafactor", groups, {"lr": lr, **kwargs})
    if any(g.pop("lr", None) is not None for g in groups):
        logger.warning(
            "Adafactor with relative_step=True computes its own step size: unet_lr/text_encoder_lr ignored"
        )
    optimizer = construct_optimizer(Adafactor, "Adafactor", groups, {"lr": None, **kwargs})
    optimizer.defaults[_ADAFACTOR_INITIAL_LR] = lr
    return optimizer


def _sgd_nesterov(groups: list[dict], lr: float, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    kwargs.setdefault("momentum", 0.9)
    return construct_optimizer(torch.optim.SGD, "SGDNesterov", groups, {"lr": lr, "nesterov": True, **kwargs})


_BUILDERS: dict[str, Callable[[list[dict], float, dict[str, Any]], torch.optim.Optimizer]] = {
    "AdamW": _adamw,
    "AdamW8bit": _adamw8bit,
    "Lion": _lion,
    "Prodigy": _prodigy,
    "Adafactor": _adafactor,
    "SGDNesterov": _sgd_nesterov,
}


def create_optimizer(
    name: str, param_groups: list[dict], *, lr: float, optimizer_args: dict[str, Any], dry_run: bool = False
) -> torch.optim.Optimizer:
    """Build the named optimizer over param groups ({"params": [...], "lr": ...}); `lr` is the default rate.

    `dry_run`: only to check the settings (no CPU kernel probe of 8-bit optimizers).
    """
    canonical = canonical_optimizer_name(name)
    if "lr" in optimizer_args:
        raise _issue(
            "optimizer_args",
            "lr cannot be set in optimizer_args",
            "set learning_rate (or unet_lr/text_encoder_lr)",
        )
    groups = [dict(g) for g in param_groups]
    if not any(g.get("params") for g in groups):
        raise TrainingError(
            "there are no trainable parameters to optimize",
            "train the UNet, the text encoder or both (network_train_unet_only / network_train_text_encoder_only)",
        )
    if canonical == "AdamW8bit":
        return _adamw8bit(groups, lr, dict(optimizer_args), dry_run=dry_run)
    if canonical in _BUILDERS:
        return _BUILDERS[canonical](groups, lr, dict(optimizer_args))
    from kohya_backend.train.optimizers_extra import create_extra_optimizer  # it builds on this module

    return create_extra_optimizer(canonical, groups, lr, dict(optimizer_args))


def _is_relative_step_adafactor(optimizer: Any) -> bool:
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def _adafactor_schedule(optimizer: Any, scheduler_args: dict[str, Any]) -> LRScheduler:
    from transformers.optimization import AdafactorSchedule

    initial_lr = scheduler_args.get("initial_lr", optimizer.defaults.get(_ADAFACTOR_INITIAL_LR, 0.0))
    return AdafactorSchedule(optimizer, initial_lr=initial_lr)


def _scheduler_kwargs(name: str, warmup_steps: int, total_steps: int, num_cycles: int, power: float) -> dict:
    if name == "constant":
        return {}
    if name == "constant_with_warmup":
        return {"num_warmup_steps": warmup_steps}
    kwargs: dict[str, Any] = {"num_warmup_steps": warmup_steps, "num_training_steps": total_steps}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    return kwargs


def _check_scheduler_name(key: str, optimizer: Any) -> None:
    if key not in LR_SCHEDULER_NAMES:
        close = difflib.get_close_matches(key, LR_SCHEDULER_NAMES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise _issue(
            "lr_scheduler",
            f"unknown lr_scheduler {key!r}",
            f"{hint}supported: {', '.join(LR_SCHEDULER_NAMES)}",
        )
    if key == "adafactor" and not _is_relative_step_adafactor(optimizer):
        raise _issue(
            "lr_scheduler",
            "lr_scheduler adafactor only works with optimizer_type Adafactor and relative_step=True",
            "pick another lr_scheduler (constant_with_warmup suits Adafactor with relative_step=False)",
        )


def create_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
    scheduler_args: dict | None = None,
) -> LRScheduler:
    """Build kohya's named LR schedule (diffusers' functions); Adafactor with relative_step gets its own."""
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    key = name.strip().lower()
    extra = dict(scheduler_args or {})
    if _is_relative_step_adafactor(optimizer):
        if key != "adafactor":
            logger.warning(
                "Adafactor with relative_step=True schedules itself: lr_scheduler %r replaced by adafactor",
                name,
            )
        return _adafactor_schedule(optimizer, extra)
    _check_scheduler_name(key, optimizer)
    if warmup_steps < 0 or total_steps < 1:
        raise _issue(
            "lr_warmup_steps",
            f"warmup {warmup_steps} / total {total_steps} steps are invalid",
            "warmup >= 0, total >= 1",
        )
    if key == "constant" and warmup_steps:
        raise _issue(
            "lr_warmup_steps",
            "lr_scheduler constant has no warmup",
            "use constant_with_warmup, or lr_warmup_steps = 0",
        )
    kwargs = {**_scheduler_kwargs(key, warmup_steps, total_steps, num_cycles, power), **extra}
    schedule_fn: Any = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(key)]
    try:
        return schedule_fn(optimizer, **kwargs)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(schedule_fn).parameters if p != "optimizer"]
        raise _issue(
            "lr_scheduler_args",
            f"{key} rejected {sorted(extra)}: {exc}",
            f"{key} accepts: {', '.join(accepted)}",
        ) from exc


def current_lrs(optimizer: torch.optim.Optimizer, scheduler: LRScheduler) -> list[float]:
    """Learning rates to report per param group; for Prodigy the effective d*lr, as kohya logs it."""
    lrs = [float(v) for v in scheduler.get_last_lr()]
    groups = optimizer.param_groups
    if groups and all("d" in g for g in groups):
        return [float(g["d"]) * lr for g, lr in zip(groups, lrs)]
    return lrs


def build_optimizer(
    config: TrainConfig,
    param_groups: list[dict],
    *,
    total_steps: int,
    dry_run: bool = False,
    optimizer_type: str | None = None,
    num_processes: int = 1,
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """The optimizer and learning-rate schedule a config trains with, over `param_groups`: optimizer_args and
    lr_scheduler_args parsed as kohya parses them (Python literals); a schedule-free optimizer gets a constant
    stand-in (it schedules itself), lr_scheduler_type a scheduler class. `optimizer_type` overrides the config's
    (the trainer's platform substitute for bitsandbytes on macOS).

    With `num_processes` data-parallel processes the schedule is kohya's under accelerate: built over
    total_steps x num_processes scheduler steps (a fractional lr_warmup_steps of those, a whole number as it is),
    num_processes of them per optimizer step (see steps_per_optimizer_step)."""
    from kohya_backend.train.optimizers_extra import ConstantForScheduleFree, create_class_scheduler

    name = optimizer_type or config.optimizer_type
    optimizer = create_optimizer(
        name, param_groups, lr=config.learning_rate, optimizer_args=config.optimizer_kwargs, dry_run=dry_run
    )
    total_steps *= num_processes
    warmup = config.lr_warmup_steps_for(total_steps)
    scheduler: LRScheduler
    if is_schedule_free(name):
        scheduler = ConstantForScheduleFree(optimizer)  # they schedule themselves, as in kohya
    elif config.lr_scheduler_type:
        scheduler = create_class_scheduler(
            config.lr_scheduler_type, optimizer, config.lr_scheduler_kwargs, warmup_steps=warmup
        )
    else:
        scheduler = create_lr_scheduler(
            config.lr_scheduler,
            optimizer,
            warmup_steps=warmup,
            total_steps=total_steps,
            num_cycles=config.lr_scheduler_num_cycles,
            power=config.lr_scheduler_power,
            scheduler_args=config.lr_scheduler_kwargs,
        )
    return optimizer, scheduler


def _at_scheduler_step(schedule: Callable[[int], float], num_processes: int, step: int) -> float:
    return schedule(step * num_processes)


def steps_per_optimizer_step(scheduler: LRScheduler, num_processes: int) -> int:
    """Make a data-parallel schedule advance as kohya's does, and say how often to step it per optimizer step.

    accelerate steps a prepared scheduler once per process for every optimizer step. A LambdaLR (every named
    lr_scheduler, the schedule-free stand-in, Adafactor's) is made to read its step times `num_processes` instead
    and is stepped once: the same learning rates, and a saved position in optimizer steps that a run with another
    number of processes resumes from. Any other class (lr_scheduler_type) is stepped `num_processes` times."""
    if num_processes == 1:
        return 1
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.lr_lambdas = [
            functools.partial(_at_scheduler_step, schedule, num_processes)
            for schedule in scheduler.lr_lambdas
        ]
        return 1
    return num_processes


def check_optimizer_settings(config: TrainConfig, *, total_steps: int) -> None:
    """Build the config's optimizer and schedule over dummy parameters, one group per trained part, so a setting
    either rejects is a ConfigError before training: `config format` reports what training would.

    An optimizer whose package is missing here is left to the trainer (the machine that trains may have it).
    """
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}
        for trained, lr in (
            (config.trains_text_encoder, config.effective_text_encoder_lr),
            (config.trains_unet, config.effective_unet_lr),
        )
        if trained
    ]
    try:
        build_optimizer(config, groups, total_steps=max(1, total_steps), dry_run=True)
    except OptimizerUnavailableError:
        return


def optimizer_description(
    optimizer: torch.optim.Optimizer | type[torch.optim.Optimizer], optimizer_args: dict[str, Any]
) -> str:
    """kohya's ss_optimizer: the optimizer's module.class (of an instance or the class itself), with its
    optimizer_args in parentheses (Python str of each value), e.g. "torch.optim.adamw.AdamW(betas=(0.9, 0.99))"."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    args = ",".join(f"{key}={value}" for key, value in optimizer_args.items())
    name = f"{cls.__module__}.{cls.__name__}"
    return f"{name}({args})" if args else name
