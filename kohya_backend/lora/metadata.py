"""The training metadata kohya's sd-scripts stores in a LoRA file (ss_* and modelspec.* keys, all strings).

The WebUI, Forge and kohya's tools read these: the alias, which model family the Lora card is shown for,
the tag chips, the dataset summary, the bucket resolutions. Every key train_network.py writes is written, as
it writes it: `str()` of the Python value (so unset values read "None", switches "True"/"False", alpha as a float
"8.0"), JSON for the nested ones, in the same shapes (`ss_bucket_info` as {"buckets": {"0": {"resolution": [w, h],
"count": n}}, "mean_img_ar_error": x}, `ss_session_id` an integer, `ss_optimizer` the optimizer's class path).
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kohya_backend import __version__
from kohya_backend.errors import ModelError
from kohya_backend.models.arch import FAMILIES

NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION = f"kohya_backend/{__version__}"  # what sd-scripts fills with "sd-scripts/<commit>"
_SDXL_VERSION = "sdxl_base_v1-0"
_MODELSPEC_ARCH = {"sd_1_5": "stable-diffusion-v1/lora", "sd_xl": "stable-diffusion-xl-v1-base/lora"}
_MODELSPEC_IMPL = {"sd_1_5": "diffusers", "sd_xl": "https://github.com/Stability-AI/generative-models"}

# sd-scripts' own defaults, for keys the config leaves out (a validated config has every key it implements; the
# others are kohya arguments this trainer may not have, written with kohya's default as sd-scripts would)
_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-6,
    "unet_lr": None,
    "text_encoder_lr": None,
    "optimizer_type": "AdamW",
    "optimizer_args": None,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "max_train_steps": 1600,
    "max_train_epochs": None,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "max_grad_norm": 1.0,
    "seed": None,
    "mixed_precision": "no",
    "full_fp16": False,
    "network_module": NETWORK_MODULE,
    "network_dim": 4,
    "network_alpha": 1.0,
    "network_dropout": None,
    "network_args": None,
    "clip_skip": None,
    "max_token_length": None,
    "vae": None,
    "lowram": False,
    "noise_offset": None,
    "multires_noise_iterations": None,
    "multires_noise_discount": 0.3,
    "adaptive_noise_scale": None,
    "zero_terminal_snr": False,
    "training_comment": None,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "face_crop_aug_range": None,
    "prior_loss_weight": 1.0,
    "min_snr_gamma": None,
    "scale_weight_norms": None,
    "ip_noise_gamma": None,
    "debiased_estimation_loss": False,
    "noise_offset_random_strength": False,
    "ip_noise_gamma_random_strength": False,
    "loss_type": "l2",
    "huber_schedule": "snr",
    "huber_scale": 1.0,
    "huber_c": 0.1,
    "fp8_base": False,
    "fp8_base_unet": False,
    "validation_seed": None,
    "validation_split": 0.0,
    "max_validation_steps": None,
    "validate_every_n_epochs": None,
    "validate_every_n_steps": None,
    "resize_interpolation": None,
    "cache_latents": False,
    "shuffle_caption": False,
    "keep_tokens": 0,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_no_upscale": False,
    "flip_aug": False,
    "color_aug": False,
    "random_crop": False,
}
# config keys written as str(value), in sd-scripts' order, under ss_<key>
_PLAIN_KEYS = (
    "gradient_accumulation_steps",
    "lr_warmup_steps",
    "lr_scheduler",
    "network_dim",
    "network_dropout",
    "mixed_precision",
    "clip_skip",
    "max_token_length",
    "seed",
    "lowram",
    "noise_offset",
    "multires_noise_iterations",
    "multires_noise_discount",
    "adaptive_noise_scale",
    "zero_terminal_snr",
    "training_comment",
    "max_grad_norm",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "face_crop_aug_range",
    "prior_loss_weight",
    "min_snr_gamma",
    "scale_weight_norms",
    "ip_noise_gamma",
    "noise_offset_random_strength",
    "ip_noise_gamma_random_strength",
    "loss_type",
    "huber_schedule",
    "huber_scale",
    "huber_c",
    "validation_seed",
    "validation_split",
    "max_validation_steps",
    "validate_every_n_epochs",
    "validate_every_n_steps",
    "resize_interpolation",
)
# config keys sd-scripts writes through bool(...)
_BOOL_KEYS = ("gradient_checkpointing", "full_fp16", "cache_latents", "fp8_base", "fp8_base_unet")
# per-run dataset keys sd-scripts writes for a train_data_dir run (a dataset_config run writes ss_datasets)
_DATASET_BOOL_KEYS = (
    "color_aug",
    "flip_aug",
    "random_crop",
    "shuffle_caption",
    "enable_bucket",
    "bucket_no_upscale",
)


def base_model_version(family: str, prediction_type: str = "epsilon") -> str:
    """kohya's `ss_base_model_version`: "sd_v1", "sd_v1_v" (v-prediction) or "sdxl_base_v1-0"."""
    _check_family(family)
    if family == "sd_xl":
        return _SDXL_VERSION
    return "sd_v1_v" if prediction_type == "v" else "sd_v1"


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ModelError(
            f"unknown model family {family!r} for LoRA metadata", hint=f"use one of {', '.join(FAMILIES)}"
        )


def _value(config: Mapping[str, Any], key: str) -> Any:
    value = config.get(key)
    return _DEFAULTS.get(key) if value is None else value


def network_args_dict(network_args: Any) -> dict[str, str]:
    """`network_args` (kohya's list of "key=value" strings, or a mapping) as the dict sd-scripts stores."""
    if not network_args:
        return {}
    if isinstance(network_args, Mapping):
        return {str(k): str(v) for k, v in network_args.items()}
    items = [network_args] if isinstance(network_args, str) else list(network_args)
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        out[key.strip()] = value.strip() if sep else ""
    return out


def optimizer_description(optimizer: Any, kwargs: Mapping[str, Any] | None = None) -> str:
    """kohya's `ss_optimizer`: the optimizer's class path, with its arguments as name=value (Python str of each
    value) in parentheses when there are any, e.g. "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))"."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    name = f"{cls.__module__}.{cls.__name__}"
    args = ",".join(f"{k}={v}" for k, v in (kwargs or {}).items())
    return f"{name}({args})" if args else name


def _fallback_optimizer_name(config: Mapping[str, Any]) -> str:
    name = str(_value(config, "optimizer_type"))
    args = config.get("optimizer_args")
    if args:
        joined = ",".join(map(str, args)) if isinstance(args, list | tuple) else str(args)
        name += f"({joined})"
    return name


def _max_train_steps(config: Mapping[str, Any], num_epochs: int, num_batches_per_epoch: int) -> int:
    # sd-scripts replaces max_train_steps when max_train_epochs is set
    if config.get("max_train_epochs"):
        accum = int(_value(config, "gradient_accumulation_steps"))
        return num_epochs * math.ceil(num_batches_per_epoch / accum)
    return int(_value(config, "max_train_steps"))


def _first_lr(value: Any) -> Any:
    """sd-scripts' ss_text_encoder_lr: the value, or the first of a list (None for an empty one)."""
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return value


def _training_keys(config: Mapping[str, Any]) -> dict[str, str]:
    md = {f"ss_{key}": str(_value(config, key)) for key in _PLAIN_KEYS}
    md.update({f"ss_{key}": str(bool(_value(config, key))) for key in _BOOL_KEYS})
    alpha = _value(config, "network_alpha")
    md.update(
        {
            "ss_learning_rate": str(float(_value(config, "learning_rate"))),
            "ss_text_encoder_lr": str(_first_lr(config.get("text_encoder_lr"))),
            "ss_unet_lr": str(config.get("unet_lr")),
            "ss_network_module": str(_value(config, "network_module")),
            "ss_network_alpha": str(float(alpha)) if alpha is not None else "None",  # argparse reads a float
            "ss_v2": "False",
            "ss_debiased_estimation": str(bool(_value(config, "debiased_estimation_loss"))),
            "ss_num_validation_images": "0",
            "ss_sd_scripts_commit_hash": IMPLEMENTATION,
        }
    )
    return md


def _dataset_keys(
    config: Mapping[str, Any],
    *,
    resolution: tuple[int, int],
    datasets: list[dict[str, Any]] | None,
    tag_frequency: dict[str, Any],
    dataset_dirs: dict[str, Any],
    reg_dataset_dirs: dict[str, Any] | None,
    bucket_info: dict[str, Any] | None,
) -> dict[str, str]:
    """A dataset_config run: ss_datasets and the merged tags and folders; a train_data_dir run: its settings."""
    if datasets is not None:
        return {
            "ss_datasets": json.dumps(datasets),
            "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_dataset_dirs": json.dumps(dataset_dirs),
        }
    batch = int(_value(config, "train_batch_size"))
    md = {f"ss_{key}": str(bool(_value(config, key))) for key in _DATASET_BOOL_KEYS}
    md.update(
        {
            "ss_batch_size_per_device": str(batch),
            "ss_total_batch_size": str(batch * int(_value(config, "gradient_accumulation_steps"))),
            "ss_resolution": str((int(resolution[0]), int(resolution[1]))),
            "ss_min_bucket_reso": str(_value(config, "min_bucket_reso")),
            "ss_max_bucket_reso": str(_value(config, "max_bucket_reso")),
            "ss_keep_tokens": str(_value(config, "keep_tokens")),
            "ss_dataset_dirs": json.dumps(dataset_dirs),
            "ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs or {}),
            "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_bucket_info": json.dumps(bucket_info),
        }
    )
    return md


def _model_keys(
    config: Mapping[str, Any],
    base_model_path: Path | None,
    base_model_sha256: str | None,
    base_model_legacy_hash: str | None,
    base_model_name: str | None,
) -> dict[str, str]:
    """kohya's model keys: hashes and the file name when the model is a path here; the name as given otherwise."""
    md: dict[str, str] = {}
    if base_model_path is not None:
        md["ss_sd_model_name"] = Path(base_model_path).name
    if base_model_name is not None:
        md["ss_sd_model_name"] = base_model_name
    if base_model_legacy_hash:
        md["ss_sd_model_hash"] = base_model_legacy_hash
    if base_model_sha256:
        md["ss_new_sd_model_hash"] = base_model_sha256
    vae = config.get("vae")
    if vae:
        md["ss_vae_name"] = Path(str(vae)).name
    return md


def _modelspec_keys(
    family: str,
    config: Mapping[str, Any],
    output_name: str,
    resolution: tuple[int, int],
    prediction_type: str,
    when: float,
) -> dict[str, str]:
    md = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": _MODELSPEC_ARCH[family],
        "modelspec.implementation": _MODELSPEC_IMPL[family],
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(when)).isoformat(),
        "modelspec.prediction_type": prediction_type,
        "modelspec.implementation_version": IMPLEMENTATION,
    }
    low, high = config.get("min_timestep"), config.get("max_timestep")
    if low is not None or high is not None:
        md["modelspec.timestep_range"] = (
            f"{low if low is not None else 0},{high if high is not None else 1000}"
        )
    if config.get("clip_skip") is not None:
        md["modelspec.encoder_layer"] = str(config["clip_skip"])
    return md


def training_metadata(
    *,
    config: Mapping[str, Any],
    family: str,
    session_id: int | str,
    started_at: float,
    finished_at: float | None,
    steps: int,
    epoch: int,
    num_train_images: int,
    num_reg_images: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    tag_frequency: dict[str, Any],
    dataset_dirs: dict[str, Any],
    bucket_info: dict[str, Any] | None,
    base_model_path: Path | None,
    base_model_sha256: str | None,
    base_model_legacy_hash: str | None,
    resolution: tuple[int, int],
    output_name: str,
    prediction_type: str = "epsilon",
    reg_dataset_dirs: dict[str, Any] | None = None,
    datasets: list[dict[str, Any]] | None = None,
    optimizer_name: str | None = None,
    base_model_name: str | None = None,
) -> dict[str, str]:
    """The ss_* and modelspec.* metadata sd-scripts' train_network.py writes into a LoRA (values are strings).

    `config` holds the config's values under kohya's key names; `resolution` is (width, height); `finished_at`
    None means now (an intermediate save). `datasets` (kohya's ss_datasets entries) marks a dataset_config run;
    `optimizer_name` is optimizer_description() of the optimizer used; `base_model_name` is the model as named when
    it is not a path here (a hub id). The model hash keys are left out when the base model is not a local path,
    and `ss_vae_name` when no separate VAE was used, as sd-scripts does.
    """
    _check_family(family)
    if prediction_type not in ("epsilon", "v"):
        raise ModelError(f"unknown prediction type {prediction_type!r}", hint="use 'epsilon' or 'v'")
    finished = time.time() if finished_at is None else finished_at
    width, height = int(resolution[0]), int(resolution[1])
    md = _training_keys(config)
    md.update(
        {
            "ss_session_id": str(session_id),
            "ss_training_started_at": str(started_at),
            "ss_output_name": output_name,
            "ss_num_train_images": str(num_train_images),
            "ss_num_reg_images": str(num_reg_images),
            "ss_num_batches_per_epoch": str(num_batches_per_epoch),
            "ss_num_epochs": str(num_epochs),
            "ss_max_train_steps": str(_max_train_steps(config, num_epochs, num_batches_per_epoch)),
            "ss_base_model_version": base_model_version(family, prediction_type),
            "ss_optimizer": optimizer_name or _fallback_optimizer_name(config),
            "ss_training_finished_at": str(finished),
            "ss_steps": str(steps),
            "ss_epoch": str(epoch),
        }
    )
    md.update(
        _dataset_keys(
            config,
            resolution=(width, height),
            datasets=datasets,
            tag_frequency=tag_frequency,
            dataset_dirs=dataset_dirs,
            reg_dataset_dirs=reg_dataset_dirs,
            bucket_info=bucket_info,
        )
    )
    network_args = network_args_dict(config.get("network_args"))
    if network_args:
        md["ss_network_args"] = json.dumps(network_args)
    md.update(
        _model_keys(config, base_model_path, base_model_sha256, base_model_legacy_hash, base_model_name)
    )
    md.update(_modelspec_keys(family, config, output_name, (width, height), prediction_type, finished))
    return md
