"""The bridge from a validated config to the dataset plan; torch-free so formatting a config stays light."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import ParseError

from kohya_backend.config.parse import ParsedConfig
from kohya_backend.config.schema import defaults_for
from kohya_backend.config.validate import TrainConfig
from kohya_backend.data.dataset_config import (
    DatasetConfig,
    is_dataset_config,
    load_dataset_config,
    read_dataset_config,
    scan_dataset_config,
)
from kohya_backend.data.plan import TrainingPlan, plan_training
from kohya_backend.data.scan import DatasetScan, scan_dataset
from kohya_backend.errors import DatasetError


def scan_for(config: TrainConfig, *, verify_images: bool = True) -> DatasetScan:
    """The dataset a config trains on: its dataset_config when set (kohya then ignores train_data_dir), else
    train_data_dir with reg_data_dir."""
    values = config.values
    if values.get("dataset_config"):
        found = load_dataset_config(Path(values["dataset_config"]), fm_type=config.fm_type, training=values)
        return scan_dataset_config(found, verify_images=verify_images)
    from kohya_backend.storage.uri import is_s3_uri

    reg = values.get("reg_data_dir")
    return scan_dataset(
        Path(values["train_data_dir"]),
        values["caption_extension"],
        reg_data_dir=Path(reg) if reg and not is_s3_uri(reg) else None,
        verify_images=verify_images,
    )


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


def _dataset_config_text(source: object) -> str | None:
    """The text of `source` when it is a kohya dataset_config TOML rather than a training config."""
    if not isinstance(source, str) or source.lstrip().startswith("{"):
        return None
    try:
        data = tomlkit.parse(source.lstrip("\ufeff")).unwrap()
    except ParseError:
        return None
    return source if is_dataset_config(data) else None


def format_dataset_config(text: str, fm_type: str, *, scan: bool = True) -> dict[str, Any]:
    """`config format` on a dataset_config TOML: checked as one, written back canonically, and planned (each
    subset with its options) with kohya's defaults for the training keys it falls back to."""
    training = defaults_for(fm_type)
    found: DatasetConfig = read_dataset_config(
        text, source="dataset_config", fm_type=fm_type, training=training
    )
    out: dict[str, Any] = {
        "toml": found.toml,
        "warnings": [w.to_dict() for w in found.warnings],
        "plan": None,
        "dataset_error": None,
        "kind": "dataset_config",
    }
    if scan:
        try:
            dataset = scan_dataset_config(found)
            config = TrainConfig(fm_type=fm_type, values=training)
            plan = plan_for(config, dataset)
            out["plan"], out["plan_text"] = plan.to_dict(), plan.render()
        except DatasetError as exc:
            out["dataset_error"] = {"message": str(exc), "files": [str(f) for f in exc.files]}
    return out


def format_with_plan(
    source: str | Mapping[str, Any] | ParsedConfig,
    fm_type: str,
    *,
    require_paths: bool = True,
    check_paths_exist: bool = True,
    cuda_available: bool | None = None,
) -> dict[str, Any]:
    """Format config_params and, when its dataset can be scanned, add the training plan (CLI and API share this).

    A kohya dataset_config TOML given as text is checked as one (format_dataset_config). `cuda_available` is
    whether the machine that will train has a CUDA GPU (None: this one, asked through torch).
    """
    from kohya_backend.config.format import format_config

    dataset_text = _dataset_config_text(source)
    if dataset_text is not None:
        return format_dataset_config(dataset_text, fm_type, scan=check_paths_exist)
    result = format_config(
        source,
        fm_type,
        require_paths=require_paths,
        check_paths_exist=check_paths_exist,
        cuda_available=cuda_available,
    )
    out: dict[str, Any] = {
        "toml": result.toml,
        "warnings": [w.to_dict() for w in result.warnings],
        "plan": None,
        "dataset_error": None,
    }
    values = result.config.values
    from kohya_backend.storage.uri import is_s3_uri

    # A dataset on S3 is scanned once the job downloaded it: its plan then comes from the trainer's plan event.
    local = values.get("dataset_config") or (
        values.get("train_data_dir") and not is_s3_uri(values["train_data_dir"])
    )
    if check_paths_exist and local:
        try:
            plan = plan_for(result.config, scan_for(result.config))
            out["plan"], out["plan_text"] = plan.to_dict(), plan.render()
        except DatasetError as exc:
            out["dataset_error"] = {"message": str(exc), "files": [str(f) for f in exc.files]}
    return out
