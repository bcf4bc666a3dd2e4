"""Optimizers and learning-rate schedulers by kohya's names, with kohya's argument handling."""

from __future__ import annotations

import ast
import difflib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from kohya_backend.config.optimizers import resolve_optimizer
from kohya_backend.config.schema import LR_SCHEDULERS, OPTIMIZERS
from kohya_backend.errors import ConfigError, ConfigIssue, OptimizerUnavailableError, TrainingError

logger = logging.getLogger(__name__)

OPTIMIZER_NAMES: tuple[str, ...] = OPTIMIZERS  # one list, kept by the config schema
LR_SCHEDULER_NAMES: tuple[str, ...] = LR_SCHEDULERS
_LITERAL_WORDS = {"true": True, "false": False, "none": None, "null": None}
_ADAFACTOR_INITIAL_LR = "kohya_initial_lr"


def _issue(key: str, message: str, hint: str | None = None) -> ConfigError:
    return ConfigError([ConfigIssue(message=message, key=key, hint=hint)])


def _parse_value(key: str, raw: str, text: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        pass
    if raw.lower() in _LITERAL_WORDS:
        return _LITERAL_WORDS[raw.lower()]
    if raw.isidentifier():
        return raw
    raise _issue(
        key,
        f"cannot read the value in {text!r}",
        "values are Python literals: numbers (1e-2), True/False, strings ('x'), tuples (0.9,0.99)",
    )


def parse_kv_args(args: list[str] | dict[str, Any] | None, *, key: str = "optimizer_args") -> dict[str, Any]:
    """Turn kohya's ["name=value", ...] (values are Python literals, read with ast.literal_eval) into a dict."""
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    if not isinstance(args, (list, tuple)):
        raise _issue(
            key, f'expected a list of "name=value" strings, got {args!r}', 'write e.g. ["weight_decay=0.01"]'
        )
    result: dict[str, Any] = {}
    for text in args:
        if not isinstance(text, str) or "=" not in text:
            raise _issue(
                key, f"entry {text!r} is not of the form name=value", 'write e.g. "weight_decay=0.01"'
            )
        name, raw = (part.strip() for part in text.split("=", 1))
        if not name.isidentifier():
            raise _issue(
                key, f"{name!r} in {text!r} is not an argument name", 'write e.g. "weight_decay=0.01"'
            )
        result[name] = _parse_value(key, raw, text)
    return result


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


def _adamw8bit(groups: list[dict], lr: float, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    hint = 'install a bitsandbytes build that matches your CUDA, or set optimizer_type = "AdamW"'
    try:
        import bitsandbytes as bnb
    except Exception as exc:
        raise OptimizerUnavailableError(
            f"AdamW8bit needs bitsandbytes, which cannot be loaded: {exc}", hint
        ) from exc
    on_cpu = any(p.device.type == "cpu" for g in groups for p in g["params"])
    if on_cpu:
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
    name: str, param_groups: list[dict], *, lr: float, optimizer_args: dict[str, Any]
) -> torch.optim.Optimizer:
    """Build the named optimizer over param groups ({"params": [...], "lr": ...}); `lr` is the default rate."""
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
