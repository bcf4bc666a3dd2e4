"""The optimizers and schedulers kohya builds beyond the core six: bitsandbytes 8-bit and paged optimizers, the
D-Adaptation family, schedule-free optimizers (with their train/eval mode switch), and any optimizer or scheduler
class named by import path, as sd-scripts' get_optimizer / get_scheduler_fix do (library/train_util.py)."""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from kohya_backend.config.optimizers import (
    BUILTIN_OPTIMIZERS,
    ClassRef,
    canonical_builtin,
    is_schedule_free,
    resolve_optimizer,
    resolve_scheduler,
)
from kohya_backend.errors import ConfigError, ConfigIssue, OptimizerUnavailableError
from kohya_backend.train.optim import construct_optimizer

logger = logging.getLogger(__name__)
_DADAPT_LR_HINT = 0.1  # kohya warns below this: D-Adaptation and Prodigy expect a learning rate around 1.0


def _issue(key: str, message: str, hint: str | None = None) -> ConfigError:
    return ConfigError([ConfigIssue(message=message, key=key, hint=hint)])


def import_class(ref: ClassRef, *, base: type, key: str) -> Any:
    """Import `ref` and check it is a subclass of `base`; a missing package or class is an actionable error."""
    try:
        module = importlib.import_module(ref.module)
    except ImportError as exc:
        raise OptimizerUnavailableError(
            f"{ref.path} needs the {ref.module.split('.')[0]} package, which cannot be loaded: {exc}",
            f"install it in the trainer's environment, or choose another {key}",
        ) from exc
    cls = getattr(module, ref.name, None)
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise _issue(
            key,
            f"{ref.path} is not a {base.__name__} class",
            f"name a {base.__name__} class, e.g. torch.optim.AdamW",
        )
    return cls


@functools.cache
def bnb_cpu_problem(class_name: str) -> str | None:
    """Run one step of a bitsandbytes optimizer on a CPU tensor; return why it failed, or None when it works."""
    import bitsandbytes as bnb

    probe = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4096))
    probe.grad = torch.ones_like(probe)
    before = probe.detach().clone()
    extra = {"momentum": 0.9} if class_name.startswith("SGD") else {}
    try:
        getattr(bnb.optim, class_name)([probe], lr=1e-3, **extra).step()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if not torch.isfinite(probe).all() or torch.equal(probe.detach(), before):
        return "its step gave no valid update on CPU"
    return None


def _check_bnb(ref: ClassRef, label: str, groups: list[dict]) -> None:
    if not ref.module.startswith("bitsandbytes"):
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        raise OptimizerUnavailableError(
            f"{label} needs bitsandbytes, which cannot be loaded: {exc}",
            'install a bitsandbytes build that matches your CUDA, or set optimizer_type = "AdamW"',
        ) from exc
    if any(p.device.type == "cpu" for g in groups for p in g["params"]):
        problem = bnb_cpu_problem(ref.name)
        if problem is not None:
            raise OptimizerUnavailableError(
                f"{label} cannot run on CPU with this bitsandbytes ({problem})",
                'train on a CUDA GPU, or set optimizer_type = "AdamW"',
            )


def _warn_adaptive_lrs(label: str, groups: list[dict], lr: float) -> None:
    lrs = {g.get("lr", lr) for g in groups}
    first = groups[0].get("lr", lr) if groups else lr
    if first <= _DADAPT_LR_HINT:
        logger.warning(
            "%s adapts its step size: a learning rate around 1.0 is recommended, got %g", label, first
        )
    if len(lrs) > 1:
        logger.warning("%s with several learning rates: kohya notes only the first one takes effect", label)


def build_class(ref: ClassRef, label: str, groups: list[dict], lr: float, kwargs: dict[str, Any]) -> Any:
    """Import an optimizer class and build it over the groups, as kohya's builtin names and class paths do."""
    _check_bnb(ref, label, groups)
    cls = import_class(ref, base=torch.optim.Optimizer, key="optimizer_type")
    if label in ("SGDNesterov8bit",):
        kwargs.setdefault("momentum", 0.9)
        kwargs = {"nesterov": True, **kwargs}
    if label.startswith("DAdapt"):
        _warn_adaptive_lrs(label, groups, lr)
    optimizer: Any = construct_optimizer(cls, label, groups, {"lr": lr, **kwargs})
    if is_schedule_free(label):
        optimizer.train()  # schedule-free optimizers start in train mode; eval() before saving and sampling
    return optimizer


def create_extra_optimizer(name: str, groups: list[dict], lr: float, kwargs: dict[str, Any]) -> Any:
    """Build any optimizer the core builders do not: a kohya builtin name, a torch.optim name or a class path."""
    ref, problem = resolve_optimizer(name)
    if ref is None:
        raise _issue(
            "optimizer_type",
            problem or f"unknown optimizer {name!r}",
            f"use one of {', '.join(BUILTIN_OPTIMIZERS)}, or a class path such as pytorch_optimizer.CAME",
        )
    label = canonical_builtin(name) or ref.path
    return build_class(ref, label, groups, lr, kwargs)


def set_optimizer_mode(optimizer: Any, optimizer_type: str, *, train: bool) -> None:
    """Switch a schedule-free optimizer between train mode (steps) and eval mode (the averaged weights that are
    saved and sampled), as kohya's optimizer_train_fn / optimizer_eval_fn; other optimizers are left alone."""
    if is_schedule_free(optimizer_type):
        (optimizer.train if train else optimizer.eval)()


class ConstantForScheduleFree(torch.optim.lr_scheduler.LambdaLR):
    """Stands in for the LR scheduler with schedule-free optimizers, which schedule themselves (kohya's dummy)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer, lambda _step: 1.0)


def create_class_scheduler(
    name: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any], *, warmup_steps: int
) -> LRScheduler:
    """Build lr_scheduler_type (a torch.optim.lr_scheduler name or an allowed class path) with lr_scheduler_args,
    as kohya; warmup belongs to the class's own arguments, so lr_warmup_steps must be 0."""
    ref, problem = resolve_scheduler(name)
    if ref is None:
        raise _issue("lr_scheduler_type", problem or f"unknown scheduler {name!r}", "e.g. CosineAnnealingLR")
    if warmup_steps:
        raise _issue(
            "lr_warmup_steps",
            f"lr_scheduler_type {name} does not use lr_warmup_steps (kohya refuses it too)",
            "set lr_warmup_steps = 0, or give the warmup in lr_scheduler_args if the class has one",
        )
    cls = import_class(ref, base=LRScheduler, key="lr_scheduler_type")
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as exc:
        raise _issue(
            "lr_scheduler_args", f"{ref.path} rejected {sorted(kwargs)}: {exc}", "check lr_scheduler_args"
        ) from exc
