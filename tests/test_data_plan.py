"""The training plan: hand-checked steps per epoch, epochs, totals, buckets, reg balancing and rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kohya_backend.assets.dataset import write_demo_dataset
from kohya_backend.data.buckets import BucketAssigner
from kohya_backend.data.plan import TrainingPlan, plan_training
from kohya_backend.data.scan import DatasetScan, scan_dataset
from kohya_backend.errors import ConfigError


def _plan(scan: DatasetScan, **overrides: Any) -> TrainingPlan:
    buckets: dict[str, Any] = {
        "enable_bucket": True, "min_size": 256, "max_size": 1024, "reso_steps": 64, "no_upscale": False,
    }  # fmt: skip
    settings: dict[str, Any] = {
        "train_batch_size": 2, "gradient_accumulation_steps": 1, "max_train_steps": 1600, "max_train_epochs": None,
    }  # fmt: skip
    for key, value in overrides.items():
        (buckets if key in buckets else settings)[key] = value
    return plan_training(scan, BucketAssigner((512, 512), **buckets), **settings)


@pytest.fixture
def demo(tmp_path: Path) -> DatasetScan:
    """8 images x 10 repeats."""
    return scan_dataset(write_demo_dataset(tmp_path / "train", count=8, size=(16, 16)), ".txt")


def test_eight_images_ten_repeats_batch_two(demo: DatasetScan) -> None:
    plan = _plan(demo)
    assert (plan.num_train_images, plan.batches_per_epoch, plan.steps_per_epoch) == (80, 40, 40)
    assert (plan.epochs, plan.total_steps) == (40, 1600)  # max_train_steps wins without max_train_epochs
    assert plan.buckets == {"512x512": 80}
    assert plan.folders == [
        {"name": "10_demo", "path": str(demo.subsets[0].path), "images": 8, "repeats": 10,
         "class_token": "demo", "is_reg": False, "uncaptioned": 0, "dataset": 0, "options": {}},
    ]  # fmt: skip


def test_epochs_and_accumulation(demo: DatasetScan) -> None:
    plan = _plan(demo, max_train_epochs=10)
    assert (plan.epochs, plan.total_steps) == (10, 400)
    plan = _plan(demo, gradient_accumulation_steps=3, max_train_steps=100)
    assert plan.steps_per_epoch == 14  # ceil(40 / 3)
    assert plan.epochs == 8  # ceil(100 / 14)
    assert _plan(demo, train_batch_size=3).steps_per_epoch == 27  # ceil(80 / 3)


def test_buckets_count_per_bucket_batches(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, folder="3_square", count=3, size=(16, 16))
    write_demo_dataset(tmp_path, folder="3_tall", count=2, size=(16, 24))
    plan = _plan(scan_dataset(tmp_path, ".txt"))
    # 512x512: 9 items -> 5 batches; 384x640: 6 items -> 3 batches (batches never mix buckets)
    assert plan.buckets == {"384x640": 6, "512x512": 9}
    assert plan.steps_per_epoch == 8
    without = _plan(scan_dataset(tmp_path, ".txt"), enable_bucket=False, no_upscale=True)
    assert without.buckets == {"512x512": 15} and without.steps_per_epoch == 8


def test_reg_images_double_the_epoch_and_surplus_is_warned(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "train", count=8, size=(16, 16))
    write_demo_dataset(tmp_path / "reg", folder="1_person", count=4, size=(16, 16))
    plan = _plan(scan_dataset(tmp_path / "train", ".txt", reg_data_dir=tmp_path / "reg"))
    assert (plan.num_train_images, plan.num_reg_images, plan.steps_per_epoch) == (80, 4, 80)
    assert plan.buckets == {"512x512": 160}
    write_demo_dataset(tmp_path / "small", folder="1_me", count=2, size=(16, 16))
    plan = _plan(scan_dataset(tmp_path / "small", ".txt", reg_data_dir=tmp_path / "reg"), train_batch_size=1)
    assert plan.steps_per_epoch == 4
    assert any("2 regularisation image(s) are not used" in w for w in plan.warnings)


def test_dict_is_json_ready_and_render_reads_well(demo: DatasetScan) -> None:
    plan = _plan(demo, max_train_epochs=2)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["steps_per_epoch"] == 40 and data["total_steps"] == 80 and data["buckets"] == {"512x512": 80}
    text = plan.render()
    assert "10_demo: 8 image(s) x 10 repeats" in text
    assert "40 steps per epoch" in text and "Epochs: 2, total steps: 80" in text and "512x512: 80" in text


def test_scan_warnings_are_carried_into_the_plan(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, count=2, size=(16, 16))
    (tmp_path / "10_demo" / "000.txt").unlink()
    plan = _plan(scan_dataset(tmp_path, ".txt"))
    assert plan.folders[0]["uncaptioned"] == 1 and "1 without caption" in plan.render()
    assert any("no caption file" in w for w in plan.warnings)


def test_impossible_counts_are_config_errors(demo: DatasetScan) -> None:
    with pytest.raises(ConfigError) as caught:
        _plan(demo, train_batch_size=0, gradient_accumulation_steps=0, max_train_steps=0)
    keys = {issue.key for issue in caught.value.issues}
    assert keys == {"train_batch_size", "gradient_accumulation_steps", "max_train_steps"}
    with pytest.raises(ConfigError, match="max_train_epochs"):
        _plan(demo, max_train_epochs=0)


def test_steps_with_several_processes_count_rounds_as_kohya(demo: DatasetScan) -> None:
    """kohya under accelerate: train_batch_size is per process and a step takes one batch on each, so steps per
    epoch are ceil(ceil(batches / processes) / gradient_accumulation_steps); ss_num_batches_per_epoch is the
    per-process count."""
    plan = _plan(demo, train_batch_size=3, num_processes=2, gradient_accumulation_steps=2, max_train_epochs=2)
    # 80 items at batch 3: 27 batches; 2 processes: 14 each; accumulation 2: 7 steps per epoch
    assert (plan.batches_per_epoch, plan.batches_per_process, plan.steps_per_epoch) == (27, 14, 7)
    assert (plan.epochs, plan.total_steps, plan.num_processes) == (2, 14, 2)
    assert "Batch size 3 x 2 processes: 27 batches per epoch, 14 per process" in plan.render()
    one = _plan(demo, train_batch_size=3, gradient_accumulation_steps=2, max_train_epochs=2)
    assert (one.batches_per_process, one.steps_per_epoch, one.total_steps) == (27, 14, 28)
    assert "x 1 processes" not in one.render() and plan.to_dict()["batches_per_process"] == 14
