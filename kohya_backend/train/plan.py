"""The bridge from a validated config to the dataset plan; torch-free so formatting a config stays light."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from kohya_backend.config.parse import ParsedConfig, parse_config
from kohya_backend.config.validate import TrainConfig
from kohya_backend.data.plan import TrainingPlan, plan_training
from kohya_backend.data.scan import DatasetScan
from kohya_backend.errors import ConfigError, DatasetError


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

    parsed = source if isinstance(source, ParsedConfig) else parse_config(source)
    result = format_config(parsed, fm_type, require_paths=require_paths, cuda_available=cuda_available)
    out: dict[str, Any] = {
        "toml": result.toml,
        "warnings": [w.to_dict() for w in result.warnings],
        "plan": None,
        "dataset_error": None,
    }
    values = result.config.values
    if values.get("train_data_dir"):
        try:
            reg = values.get("reg_data_dir")
            scan = scan_dataset(
                Path(values["train_data_dir"]),
                values["caption_extension"],
                reg_data_dir=Path(reg) if reg else None,
            )
            plan = plan_for(result.config, scan)
            out["plan"], out["plan_text"] = plan.to_dict(), plan.render()
        except DatasetError as exc:
            out["dataset_error"] = {"message": str(exc), "files": [str(f) for f in exc.files]}
    plan = out["plan"]
    _check_optimizer(
        result.config, parsed, int(plan["total_steps"]) if plan else result.config["max_train_steps"]
    )
    return out


def _check_optimizer(config: TrainConfig, parsed: ParsedConfig, total_steps: int) -> None:
    """What the optimizer or its schedule would reject at the start of training, as a config error now.

    Needs torch: where it is not installed (the WebUI's own environment may lack it), the trainer checks it again.
    """
    if importlib.util.find_spec("torch") is None:
        return
    from kohya_backend.train.optim import check_optimizer_settings

    try:
        check_optimizer_settings(config, total_steps=total_steps)
    except ConfigError as exc:
        located = []
        for issue in exc.issues:
            line, column = parsed.position(issue.key) if issue.key else (None, None)
            located.append(replace(issue, line=line, column=column))
        raise ConfigError(located) from exc
