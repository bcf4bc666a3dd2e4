"""The SageMaker GPU instance types a job may train on, and what Format checks for one (precision, VRAM).

Instance types are `sagemaker:<type>` (on-demand) and `sagemaker:<type>:spot` (managed spot: up to ~70-90% cheaper,
may be interrupted and resumes by itself from its checkpoints). The catalogue holds the GPU model, count and memory
per GPU of each type; the checks are estimates for LoRA training with this trainer, refusing what cannot fit and
warning about what is tight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kohya_backend.errors import ConfigIssue, TrainManagementError

RUNNER_NAME = "sagemaker"
SPOT = "spot"


@dataclass(frozen=True)
class Gpu:
    """A GPU model: its name, architecture, memory and whether it computes in bfloat16."""

    name: str
    arch: str
    memory_gb: int
    bf16: bool


T4 = Gpu("NVIDIA T4", "Turing", 16, bf16=False)
V100 = Gpu("NVIDIA V100", "Volta", 16, bf16=False)
A10G = Gpu("NVIDIA A10G", "Ampere", 24, bf16=True)
L4 = Gpu("NVIDIA L4", "Ada Lovelace", 24, bf16=True)
L40S = Gpu("NVIDIA L40S", "Ada Lovelace", 48, bf16=True)
A100_40 = Gpu("NVIDIA A100", "Ampere", 40, bf16=True)
H100 = Gpu("NVIDIA H100", "Hopper", 80, bf16=True)


@dataclass(frozen=True)
class InstanceSpec:
    """One SageMaker instance type: its GPU model and how many it has."""

    name: str
    gpu: Gpu
    gpus: int

    def gpu_text(self) -> str:
        """'1x NVIDIA A10G 24 GB'."""
        return f"{self.gpus}x {self.gpu.name} {self.gpu.memory_gb} GB"


INSTANCES: Mapping[str, InstanceSpec] = {
    spec.name: spec
    for spec in (
        InstanceSpec("ml.g4dn.xlarge", T4, 1),
        InstanceSpec("ml.g4dn.2xlarge", T4, 1),
        InstanceSpec("ml.g4dn.12xlarge", T4, 4),
        InstanceSpec("ml.g5.xlarge", A10G, 1),
        InstanceSpec("ml.g5.2xlarge", A10G, 1),
        InstanceSpec("ml.g5.4xlarge", A10G, 1),
        InstanceSpec("ml.g5.8xlarge", A10G, 1),
        InstanceSpec("ml.g5.12xlarge", A10G, 4),
        InstanceSpec("ml.g5.48xlarge", A10G, 8),
        InstanceSpec("ml.g6.xlarge", L4, 1),
        InstanceSpec("ml.g6.2xlarge", L4, 1),
        InstanceSpec("ml.g6e.xlarge", L40S, 1),
        InstanceSpec("ml.g6e.2xlarge", L40S, 1),
        InstanceSpec("ml.p3.2xlarge", V100, 1),
        InstanceSpec("ml.p3.8xlarge", V100, 4),
        InstanceSpec("ml.p4d.24xlarge", A100_40, 8),
        InstanceSpec("ml.p5.48xlarge", H100, 8),
    )
}


@dataclass(frozen=True)
class InstanceChoice:
    """An instance type as a job names it: the SageMaker type, on-demand or managed spot."""

    spec: InstanceSpec
    spot: bool

    @property
    def name(self) -> str:
        """'sagemaker:ml.g5.2xlarge' or 'sagemaker:ml.g5.2xlarge:spot'."""
        return f"{RUNNER_NAME}:{self.spec.name}" + (f":{SPOT}" if self.spot else "")

    def label(self) -> str:
        """What the Training Instance Type list shows."""
        return f"SageMaker {self.spec.name}: {self.spec.gpu_text()}, {'spot' if self.spot else 'on-demand'}"

    def entry(self) -> dict[str, Any]:
        """The instance_types() entry of this choice."""
        return {
            "name": self.name,
            "kind": RUNNER_NAME,
            "label": self.label(),
            "instance_type": self.spec.name,
            "spot": self.spot,
            "gpu": self.spec.gpu.name,
            "gpu_arch": self.spec.gpu.arch,
            "gpus": self.spec.gpus,
            "gpu_memory_gb": self.spec.gpu.memory_gb,
            "bf16": self.spec.gpu.bf16,
            "cuda": True,
            "devices": [self.name],
        }


def choices() -> list[InstanceChoice]:
    """Every instance type, on-demand then spot, in catalogue order."""
    return [InstanceChoice(spec, spot) for spec in INSTANCES.values() for spot in (False, True)]


def parse_instance_type(text: str) -> InstanceChoice:
    """`sagemaker:<type>[:spot]` as an InstanceChoice; TrainManagementError listing the types otherwise."""
    runner, _, rest = text.partition(":")
    instance, _, mode = rest.partition(":")
    spec = INSTANCES.get(instance)
    if runner != RUNNER_NAME or spec is None or mode not in ("", SPOT):
        raise TrainManagementError(
            f"instance type {text!r} is not a SageMaker GPU instance type this trainer knows",
            f"use {RUNNER_NAME}:<type> or {RUNNER_NAME}:<type>:{SPOT}, with <type> one of: {', '.join(INSTANCES)}",
        )
    return InstanceChoice(spec, mode == SPOT)


# GB of GPU memory a LoRA training needs at the FM type's usual resolution with mixed precision, by
# (fm_type, gradient_checkpointing); fp32 ("no" mixed precision) needs about half as much again.
_NEED_GB = {
    ("sd_1_5", False): 10.0,
    ("sd_1_5", True): 6.0,
    ("sd_xl", False): 22.0,
    ("sd_xl", True): 12.0,
}
_FP32_FACTOR = 1.5
_TIGHT = 0.8


def _bigger(spec: InstanceSpec, need: float) -> str:
    found = [s.name for s in INSTANCES.values() if s.gpu.memory_gb >= need and s.gpus == 1][:3]
    return ", ".join(found) or "a larger instance type"


def check_config(choice: InstanceChoice, fm_type: str, values: Mapping[str, Any]) -> list[ConfigIssue]:
    """Problems (severity error) and warnings of a formatted config for this instance: bf16 on a GPU without it,
    and the estimated GPU memory the FM type needs against what one GPU has."""
    spec, issues = choice.spec, []
    precision = str(values.get("mixed_precision") or "no")
    if precision == "bf16" and not spec.gpu.bf16:
        issues.append(
            ConfigIssue(
                f'mixed_precision = "bf16" needs an Ampere or newer GPU; {spec.name} has {spec.gpu.name} '
                f"({spec.gpu.arch}), which has no bf16",
                key="mixed_precision",
                hint=f'use mixed_precision = "fp16", or an instance with bf16 such as {_bigger(spec, 24)}',
            )
        )
    checkpointing = bool(values.get("gradient_checkpointing"))
    need = _NEED_GB.get((fm_type, checkpointing))
    if need is not None:
        need *= _FP32_FACTOR if precision == "no" else 1.0
        memory = spec.gpu.memory_gb
        what = f"{fm_type} LoRA training needs about {need:.0f} GB of GPU memory"
        how = "with gradient_checkpointing" if checkpointing else "without gradient_checkpointing"
        fixes = []
        if not checkpointing:
            fixes.append("set gradient_checkpointing = true")
        if precision == "no":
            fixes.append('set mixed_precision = "fp16"' + ("" if not spec.gpu.bf16 else ' or "bf16"'))
        fixes.append(f"or pick an instance with more memory per GPU ({_bigger(spec, need)})")
        if need > memory:
            issues.append(
                ConfigIssue(
                    f"{what} {how}, and {spec.name}'s {spec.gpu.name} has {memory} GB",
                    key="gradient_checkpointing" if not checkpointing else "mixed_precision",
                    hint="; ".join(fixes),
                )
            )
        elif need > _TIGHT * memory:
            issues.append(
                ConfigIssue(
                    f"{what} {how}: {spec.name}'s {memory} GB is tight (large batches or resolutions may run out)",
                    key="gradient_checkpointing",
                    hint="; ".join(fixes),
                    severity="warning",
                )
            )
    if spec.gpus > 1:
        issues.append(
            ConfigIssue(
                f"{spec.name} has {spec.gpus} GPUs: a job trains data-parallel on as many as its GPUs per job "
                f"(train_batch_size is per GPU)",
                hint=f"set GPUs per job to {spec.gpus} to use them all; for one GPU, a single-GPU type with the same "
                f"GPU ({_bigger(spec, spec.gpu.memory_gb)}) costs less",
                severity="warning",
            )
        )
    return issues
