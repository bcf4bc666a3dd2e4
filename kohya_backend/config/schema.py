"""The config_params schema: every key this trainer accepts (SCHEMA, read off the typed TrainConfig's field
declarations), the kohya keys it knowingly does not implement, old names, defaults per FM type, the canonical TOML
writer and the starting template.

Validation, formatting, the UI's defaults and the config reference are all derived from these tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import tomlkit

from kohya_backend.config.choices import (
    HUBER_SCHEDULES,
    LOSS_TYPES,
    LR_SCHEDULERS,
    NETWORK_ARGS,
    NETWORK_MODULES,
    OPTIMIZERS,
    SAMPLERS,
)
from kohya_backend.config.keys import Effect, KeySpec
from kohya_backend.config.train_config import SCHEMA, TrainConfig
from kohya_backend.errors import ConfigError, ConfigIssue
from kohya_backend.families import FAMILIES, FM_TYPES

__all__ = [
    "ALIASES",
    "FM_TYPES",
    "GROUPS",
    "HUBER_SCHEDULES",
    "LOSS_TYPES",
    "LR_SCHEDULERS",
    "NETWORK_ARGS",
    "NETWORK_MODULES",
    "OPTIMIZERS",
    "SAMPLERS",
    "SCHEMA",
    "UNSUPPORTED",
    "UNSUPPORTED_DEFAULTS",
    "UNSUPPORTED_VALUES",
    "Effect",
    "KeySpec",
    "TrainConfig",
    "check_fm_type",
    "defaults_for",
    "effect_of",
    "render_toml",
    "template_toml",
    "template_values",
    "toml_value",
]

GROUPS: list[tuple[str, str]] = [
    ("model", "Base model"),
    ("dataset", "Dataset and captions"),
    ("buckets", "Resolution and aspect-ratio buckets"),
    ("caching", "Caching and data loading"),
    ("network", "LoRA network"),
    ("optimizer", "Optimizer and learning rate"),
    ("training", "Training"),
    ("noise", "Noise and loss variants"),
    ("saving", "Saving, logging and resuming"),
    ("sampling", "Sample images during training"),
    ("compat", "Memory and attention switches kept for kohya compatibility"),
]

# Keys kohya reads under another name: old name -> canonical name (the canonical TOML writes the new one).
ALIASES: dict[str, str] = {
    "caption_extention": "caption_extension",  # kohya's own misspelt alias
    "lr_restart_cycles": "lr_scheduler_num_cycles",  # written by the AWS solution's kohya templates
}


def _unsupported_table() -> dict[str, str]:
    groups: list[tuple[str, str]] = [
        (
            "huggingface_repo_id huggingface_repo_type huggingface_path_in_repo huggingface_token "
            "huggingface_repo_visibility save_state_to_huggingface resume_from_huggingface async_upload",
            "Hugging Face Hub upload/download is not supported (training runs offline); remove it",
        ),
        (
            "deepspeed zero_stage offload_optimizer_device offload_optimizer_nvme_path offload_param_device "
            "offload_param_nvme_path zero3_init_flag zero3_save_16bit_model fp16_master_weights_and_gradients",
            "DeepSpeed training is not implemented; remove it (several GPUs train data-parallel: --num-processes "
            "or GPUs per job)",
        ),
        (
            "ddp_timeout ddp_gradient_as_bucket_view ddp_static_graph",
            "data-parallel training sets DistributedDataParallel up itself (a static graph, a 2-hour timeout for "
            "rank 0's saving and sampling); remove it",
        ),
        (
            "log_tracker_config wandb_run_name wandb_api_key log_config "
            "console_log_level console_log_file console_log_simple",
            "progress goes to the job's log and events; remove it (logging_dir writes TensorBoard logs)",
        ),
        (
            "full_fp16 full_bf16",
            'pure half-precision training is not implemented; remove it and use mixed_precision = "bf16" '
            '(or "fp16" on CUDA)',
        ),
        (
            "fp8_base fp8_base_unet",
            "fp8 base weights are not implemented; remove it (gradient_checkpointing and cache_latents save memory)",
        ),
        ("masked_loss alpha_mask conditioning_data_dir", "masked loss is not implemented; remove it"),
        (
            "in_json dataset_class dataset_repeats",
            "this trainer reads kohya's folder layout only: remove it and set train_data_dir to the parent of "
            "<repeats>_<name> folders",
        ),
        (
            "face_crop_aug_range",
            "this augmentation is not implemented; remove it (flip_aug, color_aug and random_crop are supported)",
        ),
        (
            "caption_separator secondary_separator enable_wildcard weighted_captions token_warmup_min "
            "token_warmup_step",
            "this caption feature is not implemented; remove it (captions are split on commas)",
        ),
        (
            "debug_dataset cache_info skip_cache_check resize_interpolation disable_mmap_load_safetensors "
            "cpu_offload_checkpointing torch_compile dynamo_backend",
            "not implemented by this trainer; remove it",
        ),
        (
            "vae",
            "a separate VAE is not supported: the checkpoint's own VAE is used (set no_half_vae = true "
            "for SDXL); remove it",
        ),
        (
            "metadata_title metadata_author metadata_description metadata_license metadata_tags "
            "metadata_usage_hint metadata_thumbnail metadata_merged_from no_metadata",
            "custom LoRA metadata is not implemented (the title is output_name); remove it "
            "(training_comment is supported)",
        ),
        (
            "save_last_n_epochs_state save_last_n_steps save_last_n_steps_state",
            "not implemented; remove it (save_last_n_epochs is supported)",
        ),
        ("use_8bit_adam", 'remove it and set optimizer_type = "AdamW8bit"'),
        ("use_lion_optimizer", 'remove it and set optimizer_type = "Lion"'),
        ("fused_backward_pass", "not implemented; remove it"),
        (
            "dim_from_weights base_weights base_weights_multiplier",
            "not implemented; remove it (network_weights starts from an existing LoRA)",
        ),
        (
            "skip_until_initial_step initial_epoch initial_step",
            "not implemented; remove it and use save_state + resume to continue a run",
        ),
        (
            "validation_seed validation_split validate_every_n_steps validate_every_n_epochs max_validation_steps",
            "a validation split is not implemented; remove it",
        ),
        ("sample_at_first", "not implemented; remove it (use sample_every_n_epochs or sample_every_n_steps)"),
        ("config_file output_config", "config_params is itself the config file; remove it"),
        ("use_safetensors", "LoRA files are always written as safetensors; remove it"),
    ]
    return {key: why for keys, why in groups for key in keys.split()}


UNSUPPORTED: dict[str, str] = _unsupported_table()

# kohya's defaults for unsupported keys whose "off" value is not None/False/0/"": such a value changes nothing.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "dynamo_backend": "inductor",
    "token_warmup_min": 1,
    "caption_separator": ",",
    "dataset_repeats": 1,
    "zero_stage": 2,
}

# Values kohya accepts for a supported key that this trainer does not implement: key -> {value: why}.
UNSUPPORTED_VALUES: dict[str, dict[str, str]] = {
    "lr_scheduler": {
        name: ""
        for name in ("cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt", "piecewise_constant", "rex")
    },
    "network_module": {
        "networks.dylora": "kohya's own DyLoRA is not implemented; LyCORIS's is: network_module = "
        '"lycoris.kohya" with network_args = ["algo=dylora", "block_size=4"]',
        "networks.oft": "kohya's own OFT is not implemented; LyCORIS's is: network_module = \"lycoris.kohya\" "
        'with network_args = ["algo=diag-oft", "constraint=..."]',
        "networks.lora_fa": "LoRA-FA (frozen down projection) is not implemented; use networks.lora",
    },
    "log_with": {
        "wandb": "Weights & Biases logging is not implemented (training runs offline); use tensorboard",
        "all": "Weights & Biases logging is not implemented (training runs offline); use tensorboard",
    },
    "save_model_as": {
        "ckpt": "LoRA files are written as safetensors only",
        "pt": "LoRA files are written as safetensors only",
    },
}


def check_fm_type(fm_type: str) -> None:
    """Raise ConfigError unless fm_type is one this trainer supports."""
    if fm_type not in FM_TYPES:
        raise ConfigError(
            [
                ConfigIssue(
                    f"unknown FM type {fm_type!r}",
                    key="fm_type",
                    hint=f"choose one of {', '.join(FM_TYPES)}",
                )
            ]
        )


def defaults_for(fm_type: str) -> dict[str, Any]:
    """Every schema key with its default for this FM type (kohya's defaults unless the FM type overrides)."""
    check_fm_type(fm_type)
    return {name: spec.default_for(fm_type) for name, spec in SCHEMA.items()}


def effect_of(key: str) -> Effect | None:
    """What setting a key does: its Effect (used / compat / fixed), or None when it is refused or unknown."""
    spec = SCHEMA.get(key)
    return spec.effect if spec is not None else None


def toml_value(spec: KeySpec, value: Any) -> Any:
    """A normalised value as written to TOML (resolution as kohya's "w,h" string, lists as lists)."""
    if spec.kind == "resolution":
        return f"{value[0]},{value[1]}"
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def render_toml(values: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """Write values as one flat TOML, keys in schema order, one comment line per group; None is left out."""
    wanted = set(SCHEMA if keys is None else keys)
    doc = tomlkit.document()
    for group, title in GROUPS:
        names = [
            n for n, s in SCHEMA.items() if s.group == group and n in wanted and values.get(n) is not None
        ]
        if not names:
            continue
        if len(doc.body) > 0:
            doc.add(tomlkit.nl())
        doc.add(tomlkit.comment(title))
        for name in names:
            doc.add(name, toml_value(SCHEMA[name], values[name]))
    return tomlkit.dumps(doc)


_TEMPLATE_COMMON: dict[str, Any] = {
    "pretrained_model_name_or_path": "",
    "train_data_dir": "",
    "prior_loss_weight": 1.0,
    "caption_extension": ".txt",
    "shuffle_caption": True,
    "keep_tokens": 0,
    "enable_bucket": True,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "cache_latents": True,
    "network_module": "networks.lora",
    "network_dim": 32,
    "network_alpha": 16.0,
    "network_args": [],
    "network_train_unet_only": False,
    "network_train_text_encoder_only": False,
    "optimizer_type": "AdamW8bit",
    "unet_lr": 1e-4,
    "text_encoder_lr": 1e-5,
    "lr_scheduler": "cosine_with_restarts",
    "lr_warmup_steps": 0,
    "lr_scheduler_num_cycles": 1,
    "train_batch_size": 1,
    "max_train_epochs": 10,
    "mixed_precision": "fp16",
    "seed": 1337,
    "max_token_length": 225,
    "output_dir": "output",
    "output_name": "my_lora",
    "save_model_as": "safetensors",
    "save_precision": "fp16",
    "save_every_n_epochs": 1,
    "save_state": False,
}


def template_values(fm_type: str) -> dict[str, Any]:
    """The AWS solution's starting config for an FM type, with the paths left empty for the user."""
    check_fm_type(fm_type)
    return {**_TEMPLATE_COMMON, **FAMILIES[fm_type].template}


def template_toml(fm_type: str, *, cuda: bool = True) -> str:
    """The starting config_params for the UI editor: the AWS solution's template, valid once the
    empty pretrained_model_name_or_path and train_data_dir are filled in. Without a CUDA GPU to train on,
    mixed precision is off (fp16 needs CUDA) and the optimizer is AdamW (AdamW8bit's bitsandbytes needs CUDA)."""
    values = template_values(fm_type)
    if not cuda and values.get("mixed_precision") == "fp16":
        values["mixed_precision"] = "no"
    if not cuda and values.get("optimizer_type") == "AdamW8bit":
        values["optimizer_type"] = "AdamW"
    return render_toml(values, values.keys())
