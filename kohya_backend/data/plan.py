"""The training plan shown before a run: folders, buckets, steps per epoch, epochs and total steps."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import cast

from kohya_backend.data.batches import TrainItem, build_items, epoch_batches, item_repeats
from kohya_backend.data.buckets import BucketAssigner, assigner_for
from kohya_backend.data.scan import DatasetScan
from kohya_backend.errors import ConfigError, ConfigIssue

_NOT_SHOWN = frozenset({"items", "assigners", "batch_sizes", "bucket_infos"})


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
    datasets: list[dict[str, object]] = field(default_factory=list)  # per dataset of a dataset_config
    num_processes: int = 1
    batches_per_process: int = 0
    # What the trainer draws from, not shown: every image with its bucket, the bucket assigner of each dataset
    # (one without a dataset_config), each dataset's batch size (None: train_batch_size for all) and kohya's
    # ss_bucket_info per dataset.
    items: list[TrainItem] = field(default_factory=list, repr=False, compare=False)
    assigners: list[BucketAssigner] = field(default_factory=list, repr=False, compare=False)
    batch_sizes: list[int] | None = field(default=None, repr=False, compare=False)
    bucket_infos: list[dict[str, object] | None] = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict of every shown field (for the API and the job folder)."""
        return {
            f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in _NOT_SHOWN
        }

    def render(self) -> str:
        """A human-readable summary for the CLI and the UI."""
        lines = ["Dataset:"]
        for index, dataset in enumerate(self.datasets):
            w, h = cast(list[int], dataset["resolution"])
            buckets = cast(dict[str, int], dataset["buckets"])
            lines.append(
                f"  dataset {index + 1}: {w}x{h}, batch size {dataset['batch_size']}, buckets "
                + ", ".join(f"{k}: {v}" for k, v in buckets.items())
            )
        for folder in self.folders:
            kind = "reg  " if folder["is_reg"] else "train"
            uncaptioned = f", {folder['uncaptioned']} without caption" if folder["uncaptioned"] else ""
            options = cast(dict[str, object], folder.get("options") or {})
            shown = "".join(f", {k} {v}" for k, v in options.items())
            where = f" (dataset {cast(int, folder['dataset']) + 1})" if self.datasets else ""
            lines.append(
                f"  {kind} {folder['name']}{where}: {folder['images']} image(s) x {folder['repeats']} repeats, "
                f"class token '{folder['class_token']}'{uncaptioned}{shown}"
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


def _subset_options(subset: object) -> dict[str, object]:
    """A dataset_config subset's options that differ from kohya's defaults (what the plan shows for it)."""
    options = getattr(subset, "options", None)
    if options is None:
        return {}
    defaults = type(options)()
    skip = {"num_repeats", "is_reg", "class_tokens"}
    return {
        f.name: getattr(options, f.name)
        for f in fields(options)
        if f.name not in skip and getattr(options, f.name) != getattr(defaults, f.name)
    }


def _folders(scan: DatasetScan) -> list[dict[str, object]]:
    """One summary dict per dataset folder (with its dataset and options when it comes from a dataset_config)."""
    return [
        {
            "name": s.name,
            "path": str(s.path),
            "images": len(s.images),
            "repeats": s.repeats,
            "class_token": s.class_token,
            "is_reg": s.is_reg,
            "uncaptioned": s.uncaptioned,
            "dataset": s.dataset_index,
            "options": _subset_options(s),
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
    assigners = dataset_assigners(scan, assigner)
    batch_sizes = [d.batch_size for d in scan.datasets] or None
    items = build_items(scan, assigners)
    repeats = item_repeats(items, scan)
    counts: dict[tuple[int, int], int] = {}
    per_dataset: list[dict[tuple[int, int], int]] = [{} for _ in scan.datasets]
    for item, count in zip(items, repeats):
        counts[item.bucket] = counts.get(item.bucket, 0) + count
        if per_dataset:
            bucket_counts = per_dataset[scan.subsets[item.subset_index].dataset_index]
            bucket_counts[item.bucket] = bucket_counts.get(item.bucket, 0) + count
    num_batches = len(
        epoch_batches(items, scan, batch_size=train_batch_size, epoch=1, seed=0, batch_sizes=batch_sizes)
    )
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
        datasets=[
            {
                "resolution": list(params.resolution),
                "batch_size": params.batch_size,
                "enable_bucket": params.enable_bucket,
                "buckets": {f"{w}x{h}": n for (w, h), n in sorted(bucket_counts.items()) if n},
            }
            for params, bucket_counts in zip(scan.datasets, per_dataset)
        ],
        num_processes=num_processes,
        batches_per_process=per_process,
        items=items,
        assigners=assigners,
        batch_sizes=batch_sizes,
        bucket_infos=kohya_bucket_info(scan, items, assigners),
    )


def dataset_assigners(scan: DatasetScan, default: BucketAssigner) -> list[BucketAssigner]:
    """One bucket assigner per dataset of a dataset_config (its resolution and bucket settings), else `default`."""
    if not scan.datasets:
        return [default]
    return [assigner_for(d) for d in scan.datasets]


def kohya_bucket_info(
    scan: DatasetScan, items: list[TrainItem], assigners: list[BucketAssigner]
) -> list[dict[str, object] | None]:
    """kohya's `ss_bucket_info` per dataset: None without bucketing (kohya writes null), else
    {"buckets": {index: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}: indices into the dataset's
    sorted bucket list (with bucket_no_upscale, the buckets its images made), counts with repeats (regularisation
    images balanced), and the mean |bucket aspect - image aspect| over its images, repeats not counted."""
    repeats = item_repeats(items, scan)
    out: list[dict[str, object] | None] = []
    for index, assigner in enumerate(assigners):
        members = [
            (item, count)
            for item, count in zip(items, repeats)
            if len(assigners) == 1 or scan.subsets[item.subset_index].dataset_index == index
        ]
        if not assigner.enable_bucket:
            out.append(None)
            continue
        resos = (
            sorted({item.bucket for item, _ in members})
            if assigner.no_upscale
            else sorted(assigner.resolutions)
        )
        counts: dict[tuple[int, int], int] = {}
        for item, count in members:
            counts[item.bucket] = counts.get(item.bucket, 0) + count
        errors = [
            abs(item.bucket[0] / item.bucket[1] - item.image.width / item.image.height) for item, _ in members
        ]
        out.append(
            {
                "buckets": {
                    str(i): {"resolution": [w, h], "count": counts[(w, h)]}
                    for i, (w, h) in enumerate(resos)
                    if counts.get((w, h))
                },
                "mean_img_ar_error": sum(errors) / len(errors) if errors else 0,
            }
        )
    return out
