"""Which optimizer and LR scheduler names a config may give, as kohya's get_optimizer / get_scheduler_fix read them
(sd-scripts library/train_util.py), without importing torch.

kohya matches its own optimizer names case-insensitively; any other name is a class: a bare name from torch.optim,
or a full import path ("pytorch_optimizer.CAME"). Class paths are imported only from the optimizer packages below:
a config can come from a remote client, and importing an arbitrary module runs its code.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

# kohya's own names, each with the class it builds ("module:Class"); matched case-insensitively
BUILTIN_OPTIMIZERS: dict[str, str] = {
    "AdamW": "torch.optim:AdamW",
    "AdamW8bit": "bitsandbytes.optim:AdamW8bit",
    "Lion": "lion_pytorch:Lion",
    "Lion8bit": "bitsandbytes.optim:Lion8bit",
    "PagedLion8bit": "bitsandbytes.optim:PagedLion8bit",
    "PagedAdamW": "bitsandbytes.optim:PagedAdamW",
    "PagedAdamW8bit": "bitsandbytes.optim:PagedAdamW8bit",
    "PagedAdamW32bit": "bitsandbytes.optim:PagedAdamW32bit",
    "SGDNesterov": "torch.optim:SGD",
    "SGDNesterov8bit": "bitsandbytes.optim:SGD8bit",
    "Prodigy": "prodigyopt:Prodigy",
    "Adafactor": "transformers.optimization:Adafactor",
    "DAdaptation": "dadaptation.experimental:DAdaptAdamPreprint",
    "DAdaptAdamPreprint": "dadaptation.experimental:DAdaptAdamPreprint",
    "DAdaptAdaGrad": "dadaptation:DAdaptAdaGrad",
    "DAdaptAdam": "dadaptation:DAdaptAdam",
    "DAdaptAdan": "dadaptation:DAdaptAdan",
    "DAdaptAdanIP": "dadaptation.experimental:DAdaptAdanIP",
    "DAdaptLion": "dadaptation:DAdaptLion",
    "DAdaptSGD": "dadaptation:DAdaptSGD",
    "AdamWScheduleFree": "schedulefree:AdamWScheduleFree",
    "RAdamScheduleFree": "schedulefree:RAdamScheduleFree",
    "SGDScheduleFree": "schedulefree:SGDScheduleFree",
}

# Packages a class path may import from: top-level package -> (modules allowed within it, pip name).
OPTIMIZER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "torch": (("torch.optim",), "torch"),
    "bitsandbytes": (("bitsandbytes.optim", "bitsandbytes"), "bitsandbytes"),
    "dadaptation": (("dadaptation", "dadaptation.experimental"), "dadaptation"),
    "came_pytorch": (("came_pytorch",), "came-pytorch"),
    "pytorch_optimizer": (("pytorch_optimizer",), "pytorch-optimizer"),
    "schedulefree": (("schedulefree",), "schedulefree"),
    "prodigyopt": (("prodigyopt",), "prodigyopt"),
    "prodigyplus": (("prodigyplus",), "prodigy-plus-schedule-free"),
    "lion_pytorch": (("lion_pytorch",), "lion-pytorch"),
    "transformers": (("transformers.optimization", "transformers"), "transformers"),
}
SCHEDULER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "torch": (("torch.optim.lr_scheduler",), "torch"),
    "transformers": (("transformers.optimization", "transformers"), "transformers"),
    "pytorch_optimizer": (("pytorch_optimizer", "pytorch_optimizer.lr_scheduler"), "pytorch-optimizer"),
    "schedulefree": (("schedulefree",), "schedulefree"),
}

# torch.optim classes a bare name may mean (kohya's fallback: getattr(torch.optim, name)), and torch's schedulers
TORCH_OPTIMIZERS: tuple[str, ...] = (
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "Adamax",
    "ASGD",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SGD",
)


@dataclass(frozen=True)
class ClassRef:
    """An optimizer or scheduler class as module path + attribute, resolved lazily by the trainer."""

    module: str
    name: str

    @property
    def path(self) -> str:
        """Dotted path, as kohya's metadata names the optimizer class."""
        return f"{self.module}.{self.name}"


def is_schedule_free(optimizer_type: str) -> bool:
    """kohya's test for a schedule-free optimizer: its name ends with "schedulefree" (any case)."""
    return optimizer_type.strip().lower().endswith("schedulefree")


def canonical_builtin(name: str) -> str | None:
    """kohya's own spelling of a builtin optimizer name given in any case, or None."""
    return {n.lower(): n for n in BUILTIN_OPTIMIZERS}.get(name.strip().lower())


def _split_path(text: str) -> ClassRef:
    module, _, attr = text.strip().rpartition(".")
    return ClassRef(module, attr)


def _allowed(ref: ClassRef, packages: dict[str, tuple[tuple[str, ...], str]], what: str) -> str | None:
    top = ref.module.split(".")[0]
    if top not in packages:
        names = ", ".join(sorted(packages))
        return f"{what} classes are imported only from {names}; {ref.module!r} is not one of them"
    modules, pip_name = packages[top]
    if ref.module not in modules:
        return f"{what} classes of {top} are imported only from {', '.join(modules)}, not {ref.module!r}"
    if not ref.name.isidentifier():
        return f"{ref.name!r} is not a class name"
    if importlib.util.find_spec(top) is None:
        return f"{ref.module} is not installed (pip install {pip_name})"
    return None


def resolve_optimizer(name: str) -> tuple[ClassRef | None, str | None]:
    """(class, problem) for an optimizer_type: a builtin name, a bare torch.optim name or an allowed class path."""
    builtin = canonical_builtin(name)
    if builtin is not None:
        module, _, attr = BUILTIN_OPTIMIZERS[builtin].partition(":")
        return ClassRef(module, attr), None
    text = name.strip()
    if "." not in text:
        if text in TORCH_OPTIMIZERS:
            return ClassRef("torch.optim", text), None
        return None, f"unknown optimizer {text!r}"
    ref = _split_path(text)
    problem = _allowed(ref, OPTIMIZER_PACKAGES, "optimizer")
    return (None, problem) if problem else (ref, None)


def resolve_scheduler(name: str) -> tuple[ClassRef | None, str | None]:
    """(class, problem) for an lr_scheduler_type: a torch.optim.lr_scheduler name or an allowed class path."""
    text = name.strip()
    ref = ClassRef("torch.optim.lr_scheduler", text) if "." not in text else _split_path(text)
    problem = _allowed(ref, SCHEDULER_PACKAGES, "scheduler")
    return (None, problem) if problem else (ref, None)
