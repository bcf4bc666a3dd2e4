"""The training plan shown before a run: folders, buckets, steps per epoch, epochs and total steps."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields

from kohya_backend.data.batches import TrainItem, build_items, epoch_batches, item_repeats
from kohya_backend.data.buckets import BucketAssigner
from kohya_backend.data.scan import DatasetScan
from kohya_backend.errors import ConfigError, ConfigIssue


@dataclass
class TrainingPlan:
    """What a run will do with a dataset and config, computed the way kohya counts it.

    `num_train_images` and `num_reg_images` count images times repeats (kohya's
    `ss_num_train_images` / `ss_num_reg_images`); `buckets` counts the items per bucket in one
    epoch, reg items (after balancing) included; `batches_per_epoch` is before gradient accumulation.
    With several processes (data-parallel) each step trains one batch per process: `batches_per_process`
    (kohya's `ss_num_batches_per_epoch`) is how many each process trains per epoch, steps count those.
    """

    folders: list[dict[str, object]]
    buckets: dict[str, int]
    num_train_images: int
    num_reg_images: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    batches_per_epoch: int
    warnings: list[str] = field(default_factory=list)
    num_processes: int = 1
    batches_per_process: int = 0
    items: list[TrainItem] = field(
        default_factory=list, repr=False, compare=False
    )  # what an epoch draws from

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict of every field but the items (for the API and the job folder)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "items"}

    def render(self) -> str:
        """A human-readable summary for the CLI and the UI."""
        lines = ["Dataset:"]
        for folder in self.folders:
            kind = "reg  " if folder["is_reg"] else "train"
            uncaptioned = f", {folder['uncaptioned']} without caption" if folder["uncaptioned"] else ""
            lines.append(
                f"  {kind} {folder['name']}: {folder['images']} image(s) x {folder['repeats']} repeats, "
                f"class token '{folder['class_token']}'{uncaptioned}"
            )
        lines.append(f"Training images (with repeats): {self.num_train_images}")
        if self.num_reg_images:
            lines.append(f"Regularisation images (with repeats): {self.num_reg_images}")
        lines.append("Buckets (items per epoch): " + ", ".join(f"{k}: {v}" for k, v in self.buckets.items()))
        accumulation = (
            f" / gradient accumulation {self.gradient_accumulation_steps}"
            if self.gradient_accumulation_steps > 1
            else ""
        )
        if self.num_processes > 1:
            lines.append(
                f"Batch size {self.batch_size} x {self.num_processes} processes: {self.batches_per_epoch} batches "
                f"per epoch, {self.batches_per_process} per process{accumulation} = {self.steps_per_epoch} steps "
                "per epoch"
            )
        else:
            lines.append(
                f"Batch size {self.batch_size}: {self.batches_per_epoch} batches per epoch{accumulation}"
                f" = {self.steps_per_epoch} steps per epoch"
            )
        lines.append(f"Epochs: {self.epochs}, total steps: {self.total_steps}")
        lines.extend(f"Warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


def _check_counts(
    train_batch_size: int,
    gradient_accumulation_steps: int,
    max_train_steps: int,
    max_train_epochs: int | None,
) -> None:
    """Reject counts that cannot make a schedule, naming the config key."""
    issues: list[ConfigIssue] = []
    if train_batch_size < 1:
        issues.append(ConfigIssue(f"must be at least 1, got {train_batch_size}", key="train_batch_size"))
    if gradient_accumulation_steps < 1:
        issues.append(
            ConfigIssue(
                f"must be at least 1, got {gradient_accumulation_steps}", key="gradient_accumulation_steps"
            )
        )
    if max_train_epochs is not None and max_train_epochs < 1:
        issues.append(
            ConfigIssue(
                f"must be at least 1, got {max_train_epochs}",
                key="max_train_epochs",
                hint="or leave it unset",
            )
        )
    if max_train_epochs is None and max_train_steps < 1:
        issues.append(
            ConfigIssue(
                f"must be at least 1 when max_train_epochs is not set, got {max_train_steps}",
                key="max_train_steps",
            )
        )
    if issues:
        raise ConfigError(issues)


def _folders(scan: DatasetScan) -> list[dict[str, object]]:
    """One summary dict per dataset folder."""
    return [
        {
            "name": s.name,
            "path": str(s.path),
            "images": len(s.images),
            "repeats": s.repeats,
            "class_token": s.class_token,
            "is_reg": s.is_reg,
            "uncaptioned": s.uncaptioned,
        }
        for s in scan.subsets
    ]


def plan_training(
    scan: DatasetScan,
    assigner: BucketAssigner,
    *,
    train_batch_size: int,
    gradient_accumulation_steps: int,
    max_train_steps: int,
    max_train_epochs: int | None,
    num_processes: int = 1,
) -> TrainingPlan:
    """Compute buckets, steps per epoch, epochs and total steps as kohya does, with plan-level warnings.

    This is the one place a run's length is computed: the trainer, its metadata and the UI read it from here.
    With `num_processes` > 1 (data-parallel) a step trains one batch on each process: kohya's steps per epoch are
    ceil(ceil(batches / processes) / gradient_accumulation_steps).
    """
    _check_counts(train_batch_size, gradient_accumulation_steps, max_train_steps, max_train_epochs)
    items = build_items(scan, assigner)
    repeats = item_repeats(items, scan)
    counts: dict[tuple[int, int], int] = {}
    for item, count in zip(items, repeats):
        counts[item.bucket] = counts.get(item.bucket, 0) + count
    num_batches = len(epoch_batches(items, scan, batch_size=train_batch_size, epoch=1, seed=0))
    per_process = math.ceil(num_batches / num_processes)
    steps_per_epoch = math.ceil(per_process / gradient_accumulation_steps)
    if max_train_epochs is not None:
        epochs, total_steps = max_train_epochs, max_train_epochs * steps_per_epoch
    else:
        total_steps, epochs = max_train_steps, math.ceil(max_train_steps / steps_per_epoch)
    warnings = list(scan.warnings)
    unused = sum(1 for item, count in zip(items, repeats) if item.is_reg and count == 0)
    if unused:
        warnings.append(
            f"{unused} regularisation image(s) are not used: kohya repeats regularisation images only up to "
            f"the {scan.num_train_items} training items"
        )
    return TrainingPlan(
        folders=_folders(scan),
        buckets={f"{w}x{h}": counts[(w, h)] for w, h in sorted(counts) if counts[(w, h)]},
        num_train_images=scan.num_train_items,
        num_reg_images=scan.num_reg_items,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        total_steps=total_steps,
        batch_size=train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        batches_per_epoch=num_batches,
        warnings=warnings,
        num_processes=num_processes,
        batches_per_process=per_process,
        items=items,
    )
