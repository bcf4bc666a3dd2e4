"""The bridge from a validated config to the dataset plan; torch-free so formatting a config stays light."""

from __future__ import annotations

from kohya_backend.config.validate import TrainConfig
from kohya_backend.data.plan import TrainingPlan, plan_training
from kohya_backend.data.scan import DatasetScan


def plan_for(config: TrainConfig, scan: DatasetScan) -> TrainingPlan:
    """The dataset plan (images, repeats, buckets, steps) a config gives on a scanned dataset."""
    cfg = config.values
    epochs = cfg.get("max_train_epochs")
    return plan_training(
        scan,
        resolution=config.resolution,
        enable_bucket=bool(cfg["enable_bucket"]),
        min_bucket_reso=int(cfg["min_bucket_reso"]),
        max_bucket_reso=int(cfg["max_bucket_reso"]),
        bucket_reso_steps=int(cfg["bucket_reso_steps"]),
        bucket_no_upscale=bool(cfg["bucket_no_upscale"]),
        train_batch_size=int(cfg["train_batch_size"]),
        gradient_accumulation_steps=int(cfg.get("gradient_accumulation_steps") or 1),
        max_train_steps=int(cfg["max_train_steps"]),
        max_train_epochs=int(epochs) if epochs else None,
    )
