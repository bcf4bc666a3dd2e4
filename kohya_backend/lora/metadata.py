"""The training metadata kohya's sd-scripts stores in a LoRA file (ss_* and modelspec.* keys, all strings).

The WebUI, Forge and kohya's tools read these: the alias, which model family the Lora card is shown for,
the tag chips, the dataset summary. Values are written the way sd-scripts writes them (`str()` of the
Python value, JSON for the nested ones) so existing readers parse them unchanged.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kohya_backend.errors import ModelError
from kohya_backend.models.arch import FAMILIES

NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.1"
_SDXL_VERSION = "sdxl_base_v1-0"
_MODELSPEC_ARCH = {"sd_1_5": "stable-diffusion-v1/lora", "sd_xl": "stable-diffusion-xl-v1-base/lora"}
_MODELSPEC_IMPL = {"sd_1_5": "diffusers", "sd_xl": "https://github.com/Stability-AI/generative-models"}

# sd-scripts' own defaults, used when the config leaves a key out (a validated config normally has them all)
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
    "network_dim": 4,
    "network_alpha": 1,
    "network_dropout": None,
    "network_args": None,
    "clip_skip": None,
    "max_token_length": None,
    "vae": None,
    "noise_offset": None,
    "min_snr_gamma": None,
    "prior_loss_weight": 1.0,
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
    "caption_dropout_rate": 0.0,
    # noise and loss options of kohya's presets (train_network.py writes each one)
    "multires_noise_iterations": None,
    "multires_noise_discount": 0.3,
    "adaptive_noise_scale": None,
    "zero_terminal_snr": False,
    "scale_weight_norms": None,
    "ip_noise_gamma": None,
    "noise_offset_random_strength": False,
    "ip_noise_gamma_random_strength": False,
    "loss_type": "l2",
    "huber_schedule": "snr",
    "huber_scale": 1.0,
    "huber_c": 0.1,
    "network_module": NETWORK_MODULE,
}
# config keys copied as str(value) into ss_<key>
_PLAIN_KEYS = (
    "lr_scheduler",
    "lr_warmup_steps",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "seed",
    "mixed_precision",
    "network_dim",
    "network_alpha",
    "network_dropout",
    "clip_skip",
    "max_token_length",
    "noise_offset",
    "min_snr_gamma",
    "prior_loss_weight",
    "keep_tokens",
    "min_bucket_reso",
    "max_bucket_reso",
    "caption_dropout_rate",
    "multires_noise_iterations",
    "multires_noise_discount",
    "adaptive_noise_scale",
    "zero_terminal_snr",
    "scale_weight_norms",
    "ip_noise_gamma",
    "noise_offset_random_strength",
    "ip_noise_gamma_random_strength",
    "loss_type",
    "huber_schedule",
    "huber_scale",
    "huber_c",
    "network_module",
)
# boolean config keys, written as "True"/"False" like sd-scripts' bool(...)
_BOOL_KEYS = (
    "gradient_checkpointing",
    "full_fp16",
    "cache_latents",
    "shuffle_caption",
    "enable_bucket",
    "bucket_no_upscale",
    "flip_aug",
    "color_aug",
    "random_crop",
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


def _optimizer_name(config: Mapping[str, Any]) -> str:
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


def _training_keys(config: Mapping[str, Any], num_epochs: int, num_batches_per_epoch: int) -> dict[str, str]:
    lr = _value(config, "learning_rate")
    batch = int(_value(config, "train_batch_size"))
    accum = int(_value(config, "gradient_accumulation_steps"))
    md = {f"ss_{key}": str(_value(config, key)) for key in _PLAIN_KEYS}
    md.update({f"ss_{key}": str(bool(_value(config, key))) for key in _BOOL_KEYS})
    md.update(
        {
            "ss_learning_rate": str(lr),
            "ss_unet_lr": str(_value(config, "unet_lr") or lr),
            "ss_text_encoder_lr": str(_value(config, "text_encoder_lr") or lr),
            "ss_optimizer": _optimizer_name(config),
            "ss_max_train_steps": str(_max_train_steps(config, num_epochs, num_batches_per_epoch)),
            "ss_batch_size_per_device": str(batch),
            "ss_total_batch_size": str(batch * accum),
            "ss_debiased_estimation": str(bool(config.get("debiased_estimation_loss"))),
            "ss_network_args": json.dumps(network_args_dict(config.get("network_args"))),
            "ss_v2": "False",
        }
    )
    return md


def _model_keys(
    config: Mapping[str, Any],
    base_model_path: Path | None,
    base_model_sha256: str | None,
    base_model_legacy_hash: str | None,
) -> dict[str, str]:
    md: dict[str, str] = {}
    if base_model_path is not None:
        md["ss_sd_model_name"] = Path(base_model_path).name
    if base_model_legacy_hash:
        md["ss_sd_model_hash"] = base_model_legacy_hash
    if base_model_sha256:
        md["ss_new_sd_model_hash"] = base_model_sha256
    vae = config.get("vae")
    if vae:
        md["ss_vae_name"] = Path(str(vae)).name
    return md


def _modelspec_keys(
    family: str, output_name: str, resolution: tuple[int, int], prediction_type: str, when: float
) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": _MODELSPEC_ARCH[family],
        "modelspec.implementation": _MODELSPEC_IMPL[family],
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(when).isoformat(timespec="seconds"),
        "modelspec.prediction_type": prediction_type,
    }


def training_metadata(
    *,
    config: Mapping[str, Any],
    family: str,
    session_id: str,
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
) -> dict[str, str]:
    """The ss_* and modelspec.* metadata sd-scripts writes into a LoRA (values are strings).

    `config` holds the config's values under kohya's key names; `resolution` is (width, height);
    `finished_at` None means now (an intermediate save). The model-name/hash keys are left out when
    the base model is unknown, and `ss_vae_name` when no separate VAE was used, as sd-scripts does.
    """
    _check_family(family)
    if prediction_type not in ("epsilon", "v"):
        raise ModelError(f"unknown prediction type {prediction_type!r}", hint="use 'epsilon' or 'v'")
    finished = time.time() if finished_at is None else finished_at
    width, height = int(resolution[0]), int(resolution[1])
    md = _training_keys(config, num_epochs, num_batches_per_epoch)
    md.update(
        {
            "ss_session_id": str(session_id),
            "ss_training_started_at": str(started_at),
            "ss_training_finished_at": str(finished),
            "ss_output_name": output_name,
            "ss_steps": str(steps),
            "ss_epoch": str(epoch),
            "ss_num_epochs": str(num_epochs),
            "ss_num_train_images": str(num_train_images),
            "ss_num_reg_images": str(num_reg_images),
            "ss_num_batches_per_epoch": str(num_batches_per_epoch),
            "ss_base_model_version": base_model_version(family, prediction_type),
            "ss_resolution": str((width, height)),
            "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_dataset_dirs": json.dumps(dataset_dirs),
            "ss_bucket_info": json.dumps(bucket_info),
        }
    )
    md.update(_model_keys(config, base_model_path, base_model_sha256, base_model_legacy_hash))
    md.update(_modelspec_keys(family, output_name, (width, height), prediction_type, finished))
    return md
