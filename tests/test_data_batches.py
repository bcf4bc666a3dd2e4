"""Items and epoch batches: repeats, buckets never mixed, determinism for resume, reg balancing."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from kohya_backend.assets.dataset import write_demo_dataset
from kohya_backend.data.batches import (
    TrainItem,
    build_items,
    epoch_batches,
    item_repeats,
    process_rounds,
    reg_repeats,
)
from kohya_backend.data.buckets import BucketAssigner
from kohya_backend.data.scan import DatasetScan, scan_dataset
from kohya_backend.errors import ConfigError, DatasetError


def _assigner(no_upscale: bool = False) -> BucketAssigner:
    return BucketAssigner(
        (512, 512), enable_bucket=True, min_size=256, max_size=1024, reso_steps=64, no_upscale=no_upscale
    )


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[DatasetScan, list[TrainItem]]:
    """3 square images x 4 repeats and 2 portrait (2:3) images x 3 repeats."""
    write_demo_dataset(tmp_path / "train", folder="4_square", count=3, size=(16, 16))
    write_demo_dataset(tmp_path / "train", folder="3_tall", count=2, size=(16, 24))
    scan = scan_dataset(tmp_path / "train", ".txt")
    return scan, build_items(scan, _assigner())


def test_build_items_one_per_image_with_buckets(mixed: tuple[DatasetScan, list[TrainItem]]) -> None:
    scan, items = mixed
    assert [(i.subset_index, i.bucket, i.is_reg) for i in items] == [
        (0, (384, 640), False), (0, (384, 640), False),
        (1, (512, 512), False), (1, (512, 512), False), (1, (512, 512), False),
    ]  # fmt: skip
    assert [i.image for i in items] == scan.subsets[0].images + scan.subsets[1].images


def test_epoch_applies_repeats_and_never_mixes_buckets(mixed: tuple[DatasetScan, list[TrainItem]]) -> None:
    scan, items = mixed
    batches = epoch_batches(items, scan, batch_size=4, epoch=1, seed=42)
    # 384x640: 2 x 3 = 6 items -> 2 batches; 512x512: 3 x 4 = 12 items -> 3 batches
    assert len(batches) == math.ceil(6 / 4) + math.ceil(12 / 4) == 5
    assert all(len({item.bucket for item in batch}) == 1 and 1 <= len(batch) <= 4 for batch in batches)
    seen = Counter(item.image.path for batch in batches for item in batch)
    assert sorted(seen.values()) == [3, 3, 4, 4, 4]


def test_epochs_are_deterministic_from_seed_and_epoch(mixed: tuple[DatasetScan, list[TrainItem]]) -> None:
    scan, items = mixed

    def order(epoch: int, seed: int) -> list[list[str]]:
        batches = epoch_batches(items, scan, batch_size=2, epoch=epoch, seed=seed)
        return [[str(item.image.path) for item in batch] for batch in batches]

    first = order(3, 7)
    assert order(3, 7) == first
    assert order(4, 7) != first and order(3, 8) != first


def test_reg_repeats_follow_kohya_balancing() -> None:
    # first pass gives each reg image its repeats (3), then one more per image, cycling, up to 20
    assert reg_repeats([1, 1, 1], 20) == [7, 7, 6]
    assert reg_repeats([2, 2], 5) == [3, 2]
    assert reg_repeats([1, 1, 1], 2) == [1, 1, 0]  # surplus reg images are not used
    assert reg_repeats([], 10) == []


def test_reg_items_are_balanced_to_the_train_items(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "train", folder="5_me", count=4, size=(16, 16))
    write_demo_dataset(tmp_path / "reg", folder="1_person", count=3, size=(16, 16))
    scan = scan_dataset(tmp_path / "train", ".txt", reg_data_dir=tmp_path / "reg")
    items = build_items(scan, _assigner())
    assert item_repeats(items, scan) == [5, 5, 5, 5, 7, 7, 6]
    batches = epoch_batches(items, scan, batch_size=4, epoch=1, seed=0)
    flat = [item for batch in batches for item in batch]
    assert len(flat) == 40 and sum(item.is_reg for item in flat) == 20
    assert len(batches) == 10


def test_batch_size_must_be_positive(mixed: tuple[DatasetScan, list[TrainItem]]) -> None:
    scan, items = mixed
    with pytest.raises(ConfigError) as caught:
        epoch_batches(items, scan, batch_size=0, epoch=1, seed=0)
    assert caught.value.issues[0].key == "train_batch_size"


def test_unbucketable_images_are_all_listed(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, folder="1_tiny", count=2, size=(32, 32))
    scan = scan_dataset(tmp_path, ".txt")
    with pytest.raises(DatasetError) as caught:
        build_items(scan, _assigner(no_upscale=True))
    assert caught.value.files == [str(item.path) for item in scan.subsets[0].images]
    assert "2 image(s) cannot be put in a bucket" in caught.value.message


def test_process_rounds_give_each_process_its_batch_of_every_round() -> None:
    # Round k: process r trains batch k*N + r, so one round is the global batch (kohya under accelerate).
    assert process_rounds(6, 2) == [[0, 1], [2, 3], [4, 5]]
    assert process_rounds(6, 3) == [[0, 1, 2], [3, 4, 5]]
    assert process_rounds(4, 1) == [[0], [1], [2], [3]]  # one process: every batch once, in order


def test_process_rounds_pad_the_last_round_from_the_start_of_the_epoch() -> None:
    # 5 batches on 2 processes: 3 rounds each (no process runs out and leaves the others waiting); the missing
    # batch of the last round is the epoch's first, as accelerate's even_batches pads.
    rounds = process_rounds(5, 2)
    assert rounds == [[0, 1], [2, 3], [4, 0]]
    assert process_rounds(7, 4) == [[0, 1, 2, 3], [4, 5, 6, 0]]
    assert process_rounds(1, 3) == [[0, 0, 0]]  # fewer batches than processes: all train the one batch
    for batches, n in [(5, 2), (7, 4), (13, 3), (25, 2)]:
        rounds = process_rounds(batches, n)
        assert all(len(r) == n for r in rounds) and len(rounds) == math.ceil(batches / n)
        assert set(b for r in rounds for b in r) == set(range(batches))  # every batch trains


def test_process_rounds_go_on_from_a_resumed_position_with_any_number_of_processes() -> None:
    # A state saved after 4 of 9 batches (by 2 processes) resumes in 1 or 3: the same 5 batches are left.
    assert process_rounds(9, 1, start=4) == [[4], [5], [6], [7], [8]]
    assert process_rounds(9, 3, start=4) == [[4, 5, 6], [7, 8, 0]]
    assert process_rounds(9, 2, start=9) == []  # the epoch was done
    with pytest.raises(ValueError, match="num_processes"):
        process_rounds(4, 0)


def test_uneven_buckets_give_every_process_the_same_number_of_rounds(tmp_path: Path) -> None:
    """Buckets of 15 and 10 items at batch 2: 8 + 5 = 13 batches, one bucket each; 2 processes run 7 rounds each
    and every batch still holds one bucket only."""
    root = tmp_path / "train"
    write_demo_dataset(root, folder="5_wide", count=3, size=(128, 64), seed=1)
    write_demo_dataset(root, folder="5_tall", count=2, size=(64, 128), seed=2)
    scan = scan_dataset(root, ".txt")
    assigner = BucketAssigner(
        (128, 64), enable_bucket=True, min_size=64, max_size=128, reso_steps=64, no_upscale=False
    )
    items = build_items(scan, assigner)
    batches = epoch_batches(items, scan, batch_size=2, epoch=1, seed=3)
    assert sorted(len(b) for b in batches) == [1] + [2] * 12  # 15 = 7 x 2 + 1, 10 = 5 x 2
    rounds = process_rounds(len(batches), 2)
    assert len(rounds) == 7 and all(len({item.bucket for item in batches[i]}) == 1 for r in rounds for i in r)
    per_process = [[r[rank] for r in rounds] for rank in range(2)]
    assert not set(per_process[0][:-1]) & set(per_process[1][:-1])  # no batch twice but the padding
