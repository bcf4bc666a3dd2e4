"""The bridge from a validated config to the dataset plan; torch-free so formatting a config stays light."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import ParseError

from kohya_backend.config.parse import ParsedConfig, parse_config
from kohya_backend.config.schema import defaults_for
from kohya_backend.config.train_config import TrainConfig
from kohya_backend.data.buckets import assigner_for
from kohya_backend.data.dataset_config import (
    DatasetConfig,
    is_dataset_config,
    load_dataset_config,
    read_dataset_config,
    scan_dataset_config,
)
from kohya_backend.data.plan import TrainingPlan, plan_training
from kohya_backend.data.scan import DatasetScan
from kohya_backend.errors import ConfigError, DatasetError


def plan_for(config: TrainConfig, scan: DatasetScan, *, num_processes: int = 1) -> TrainingPlan:
    """The dataset plan (images, repeats, buckets, steps) a config gives on a scanned dataset, trained by
    `num_processes` data-parallel processes."""
    return plan_training(
        scan,
        assigner_for(config),
        train_batch_size=config.train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_train_steps=config.max_train_steps,
        max_train_epochs=config.max_train_epochs,
        num_processes=num_processes,
    )


def scan_for(config: TrainConfig, *, verify_images: bool = True) -> DatasetScan:
    """The dataset a config trains on, scanned and checked: its dataset_config when set (kohya then ignores
    train_data_dir), else train_data_dir with reg_data_dir."""
    from kohya_backend.data.scan import scan_dataset

    if config.dataset_config:
        found = load_dataset_config(
            Path(config.dataset_config), fm_type=config.fm_type, training=config.values
        )
        return scan_dataset_config(found, verify_images=verify_images)
    if not config.train_data_dir:
        raise DatasetError(
            "train_data_dir is not set", hint='set train_data_dir = "<folder of <repeats>_<name> folders>"'
        )
    from kohya_backend.storage.uri import is_s3_uri

    reg = config.reg_data_dir
    return scan_dataset(
        Path(config.train_data_dir),
        config.caption_extension,
        reg_data_dir=Path(reg) if reg and not is_s3_uri(reg) else None,  # on S3: scanned once downloaded
        verify_images=verify_images,
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
            config = TrainConfig(fm_type=fm_type, **training)
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
    check_optimizer: bool = False,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Format config_params and, when its dataset can be scanned, add the training plan (CLI and API share this).

    A kohya dataset_config TOML given as text is checked as one (format_dataset_config). `cuda_available` is
    whether the machine that will train has a CUDA GPU (None: this one, asked through torch).
    `check_optimizer` also builds the optimizer and its schedule (imports torch: the CLI's `config format` does;
    the API and the tab, which import no torch, leave it to the trainer, which checks before loading the model).
    `num_processes`: the data-parallel processes (GPUs) the job trains in; the plan's steps count their rounds.
    """
    from kohya_backend.config.format import format_config

    dataset_text = _dataset_config_text(source)
    if dataset_text is not None:
        return format_dataset_config(dataset_text, fm_type, scan=check_paths_exist)
    parsed = source if isinstance(source, ParsedConfig) else parse_config(source)
    result = format_config(
        parsed,
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
    from kohya_backend.storage.uri import is_s3_uri

    # A dataset on S3 is scanned once the job downloaded it: its plan then comes from the trainer's plan event.
    config = result.config
    local = config.dataset_config or (config.train_data_dir and not is_s3_uri(config.train_data_dir))
    if check_paths_exist and local:
        try:
            plan = plan_for(result.config, scan_for(result.config), num_processes=num_processes)
            out["plan"], out["plan_text"] = plan.to_dict(), plan.render()
        except DatasetError as exc:
            out["dataset_error"] = {"message": str(exc), "files": [str(f) for f in exc.files]}
    plan = out["plan"]
    if check_optimizer:
        total = int(plan["total_steps"]) if plan else result.config.max_train_steps
        _check_optimizer(result.config, parsed, total)
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
