"""Training items and per-epoch batches: repeats, regularisation balancing, one bucket per batch."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from kohya_backend.data.buckets import BucketAssigner
from kohya_backend.data.scan import DatasetScan, ImageItem
from kohya_backend.errors import ConfigError, ConfigIssue, DatasetError


@dataclass(frozen=True)
class TrainItem:
    """One image with its bucket; `subset_index` points into `DatasetScan.subsets`."""

    image: ImageItem
    subset_index: int
    bucket: tuple[int, int]
    is_reg: bool


def build_items(scan: DatasetScan, assigner: BucketAssigner | Sequence[BucketAssigner]) -> list[TrainItem]:
    """One TrainItem per image (repeats are applied per epoch), in scan order; lists every unbucketable image.

    `assigner` may be one per dataset of a dataset_config (indexed by each subset's dataset_index).
    """
    assigners = [assigner] if isinstance(assigner, BucketAssigner) else list(assigner)
    items: list[TrainItem] = []
    problems: list[tuple[str, str]] = []
    for index, subset in enumerate(scan.subsets):
        chosen = assigners[subset.dataset_index if len(assigners) > 1 else 0]
        for image in subset.images:
            try:
                bucket = chosen.assign(image.width, image.height)
            except DatasetError as error:
                problems.append((str(image.path), error.message))
                continue
            items.append(TrainItem(image, index, bucket, subset.is_reg))
    if problems:
        lines = "\n".join(f"  - {path}: {reason}" for path, reason in problems)
        raise DatasetError(
            f"{len(problems)} image(s) cannot be put in a bucket:\n{lines}",
            f"use images at least {assigners[0].reso_steps} px on each side, or turn bucket_no_upscale off",
            files=[path for path, _ in problems],
        )
    return items


def reg_repeats(reg_base_repeats: list[int], num_train_items: int) -> list[int]:
    """Kohya's balancing: repeat regularisation images, cycling, until they match the training items.

    The first pass gives each image its folder's repeats; later passes add one repeat per image.
    Kohya stops as soon as the count is reached, so surplus regularisation images get 0 repeats.
    """
    counts = [0] * len(reg_base_repeats)
    total = 0
    first_pass = True
    while reg_base_repeats and total < num_train_items:
        for index, base in enumerate(reg_base_repeats):
            step = base if first_pass else 1
            counts[index] += step
            total += step
            if total >= num_train_items:
                break
        first_pass = False
    return counts


def item_repeats(items: list[TrainItem], scan: DatasetScan) -> list[int]:
    """How many times each item appears per epoch: its folder's repeats, reg items balanced as kohya does (within
    each dataset of a dataset_config)."""
    repeats = [0 if item.is_reg else scan.subsets[item.subset_index].repeats for item in items]
    dataset_of = [scan.subsets[item.subset_index].dataset_index for item in items]
    for dataset in sorted(set(dataset_of)):
        members = [i for i, d in enumerate(dataset_of) if d == dataset]
        reg_positions = [i for i in members if items[i].is_reg]
        if not reg_positions:
            continue
        train_items = sum(repeats[i] for i in members if not items[i].is_reg)
        balanced = reg_repeats(
            [scan.subsets[items[i].subset_index].repeats for i in reg_positions], train_items
        )
        for position, count in zip(reg_positions, balanced):
            repeats[position] = count
    return repeats


def epoch_rng(seed: int, epoch: int) -> random.Random:
    """A generator that depends only on (seed, epoch), so a resumed run rebuilds the same epoch."""
    return random.Random(f"kohya_backend.epoch:{seed}:{epoch}")


def epoch_batches(
    items: list[TrainItem],
    scan: DatasetScan,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    batch_sizes: Sequence[int] | None = None,
) -> list[list[TrainItem]]:
    """All batches of one epoch: repeats applied, reg balanced, never mixing buckets (or datasets), shuffled by
    (seed, epoch). `batch_sizes` gives each dataset of a dataset_config its own batch size."""
    if batch_size < 1:
        raise ConfigError(
            [
                ConfigIssue(
                    f"must be at least 1, got {batch_size}", key="train_batch_size", hint="use e.g. 1 or 2"
                )
            ]
        )
    per_bucket: dict[tuple[int, tuple[int, int]], list[TrainItem]] = {}
    for item, count in zip(items, item_repeats(items, scan)):
        dataset = scan.subsets[item.subset_index].dataset_index
        per_bucket.setdefault((dataset, item.bucket), []).extend([item] * count)
    rng = epoch_rng(seed, epoch)
    batches: list[list[TrainItem]] = []
    for key in sorted(per_bucket):
        members = per_bucket[key]
        size = batch_sizes[key[0]] if batch_sizes else batch_size
        rng.shuffle(members)
        batches.extend(members[start : start + size] for start in range(0, len(members), size))
    rng.shuffle(batches)
    return batches


def process_rounds(num_batches: int, num_processes: int, *, start: int = 0) -> list[list[int]]:
    """Which of an epoch's batches each process trains in each round, from batch `start` on (a resumed epoch).

    Round k gives process r batch `start + k * num_processes + r`, so one round is the global batch. The last round
    is filled up with the epoch's first batches, as accelerate's even_batches does for kohya: every process runs
    the same number of rounds (one collective per round never waits on a process that has run out of batches),
    and a few batches train twice in that epoch. One process gets every batch once.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    remaining = max(0, num_batches - start)
    rounds = -(-remaining // num_processes)
    return [
        [(start + k * num_processes + rank) % num_batches for rank in range(num_processes)]
        for k in range(rounds)
    ]
