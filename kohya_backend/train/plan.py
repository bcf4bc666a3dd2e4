"""The bridge from a validated config to the dataset plan; torch-free so formatting a config stays light."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kohya_backend.config.parse import ParsedConfig
from kohya_backend.config.validate import TrainConfig
from kohya_backend.data.plan import TrainingPlan, plan_training
from kohya_backend.data.scan import DatasetScan
from kohya_backend.errors import DatasetError


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


def format_with_plan(
    source: str | Mapping[str, Any] | ParsedConfig,
    fm_type: str,
    *,
    require_paths: bool = True,
    cuda_available: bool | None = None,
) -> dict[str, Any]:
    """Format config_params and, when its dataset can be scanned, add the training plan (CLI and API share this).

    `cuda_available` is whether the machine that will train has a CUDA GPU (None: this one, asked through torch).
    """
    from kohya_backend.config.format import format_config
    from kohya_backend.data.scan import scan_dataset

    result = format_config(source, fm_type, require_paths=require_paths, cuda_available=cuda_available)
    out: dict[str, Any] = {
        "toml": result.toml,
        "warnings": [w.to_dict() for w in result.warnings],
        "plan": None,
        "dataset_error": None,
    }
    values = result.config.values
    from kohya_backend.storage.uri import is_s3_uri

    # A dataset on S3 is scanned once the job downloaded it: its plan then comes from the trainer's plan event.
    if values.get("train_data_dir") and not is_s3_uri(values["train_data_dir"]):
        try:
            reg = values.get("reg_data_dir")
            scan = scan_dataset(
                Path(values["train_data_dir"]),
                values["caption_extension"],
                reg_data_dir=Path(reg) if reg and not is_s3_uri(reg) else None,
            )
            plan = plan_for(result.config, scan)
            out["plan"], out["plan_text"] = plan.to_dict(), plan.render()
        except DatasetError as exc:
            out["dataset_error"] = {"message": str(exc), "files": [str(f) for f in exc.files]}
    return out
