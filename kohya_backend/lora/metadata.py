"""The training metadata kohya's sd-scripts stores in a LoRA file (ss_* and modelspec.* keys, all strings).

The WebUI, Forge and kohya's tools read these: the alias, which model family the Lora card is shown for,
the tag chips, the dataset summary. Values are written the way sd-scripts writes them (`str()` of the
Python value, JSON for the nested ones) so existing readers parse them unchanged. Settings come from the typed
config; what was built (the network, the optimizer) and what was planned (steps, epochs) are passed in, so the
file records what was trained rather than re-deriving it.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kohya_backend.config.train_config import TrainConfig

NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.1"

# config keys written as str(value) into ss_<key>
_PLAIN_KEYS = (
    "lr_scheduler",
    "lr_warmup_steps",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "seed",
    "mixed_precision",
    "clip_skip",
    "max_token_length",
    "noise_offset",
    "min_snr_gamma",
    "prior_loss_weight",
    "keep_tokens",
    "min_bucket_reso",
    "max_bucket_reso",
    "caption_dropout_rate",
    "training_comment",
    # noise and loss options (train_network.py writes each one)
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
)
# boolean config keys, written as "True"/"False" like sd-scripts' bool(...)
_BOOL_KEYS = (
    "gradient_checkpointing",
    "cache_latents",
    "shuffle_caption",
    "enable_bucket",
    "bucket_no_upscale",
    "flip_aug",
    "random_crop",
)


@dataclass(frozen=True)
class NetworkSettings:
    """What the LoRA network was built with (read off the network, not the config)."""

    dim: int
    alpha: float
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    module: str = NETWORK_MODULE
    extra_args: Mapping[str, str] = field(default_factory=dict)  # LyCORIS: the network_args it was built with

    def args(self) -> dict[str, str]:
        """kohya's ss_network_args: the network_args that shaped the network, as strings."""
        out: dict[str, str] = dict(self.extra_args)
        if self.conv_dim is not None:
            out["conv_dim"] = str(self.conv_dim)
            if self.conv_alpha is not None:
                out["conv_alpha"] = f"{self.conv_alpha:g}"
        return out


@dataclass(frozen=True)
class BaseModel:
    """The checkpoint a LoRA was trained on: its path and the two hashes kohya records."""

    path: Path
    sha256: str | None = None
    legacy_hash: str | None = None


def _training_keys(
    config: TrainConfig, network: NetworkSettings, optimizer: str, num_processes: int
) -> dict[str, str]:
    md = {f"ss_{key}": str(getattr(config, key)) for key in _PLAIN_KEYS}
    md.update({f"ss_{key}": str(bool(getattr(config, key))) for key in _BOOL_KEYS})
    md.update(
        {
            "ss_learning_rate": str(config.learning_rate),
            "ss_unet_lr": str(config.effective_unet_lr),
            "ss_text_encoder_lr": str(config.effective_text_encoder_lr),
            "ss_optimizer": optimizer,
            "ss_batch_size_per_device": str(config.train_batch_size),
            "ss_total_batch_size": str(
                config.train_batch_size * num_processes * config.gradient_accumulation_steps
            ),
            "ss_full_fp16": "False",
            "ss_color_aug": "False",
            "ss_v2": "False",
            "ss_network_module": network.module,
            "ss_debiased_estimation": str(bool(config.debiased_estimation_loss)),
            "ss_network_dim": str(network.dim),
            "ss_network_alpha": str(network.alpha),
            "ss_network_dropout": str(network.dropout),
            "ss_network_args": json.dumps(network.args()),
        }
    )
    return md


def _model_keys(base_model: BaseModel | None) -> dict[str, str]:
    md: dict[str, str] = {}
    if base_model is None:
        return md
    md["ss_sd_model_name"] = Path(base_model.path).name
    if base_model.legacy_hash:
        md["ss_sd_model_hash"] = base_model.legacy_hash
    if base_model.sha256:
        md["ss_new_sd_model_hash"] = base_model.sha256
    return md


def _modelspec_keys(config: TrainConfig, prediction: str, when: float) -> dict[str, str]:
    width, height = config.resolution
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": config.family.modelspec_architecture,
        "modelspec.implementation": config.family.modelspec_implementation,
        "modelspec.title": config.output_stem,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(when).isoformat(timespec="seconds"),
        "modelspec.prediction_type": prediction,
    }


def training_metadata(
    *,
    config: TrainConfig,
    network: NetworkSettings,
    optimizer: str,
    session_id: str,
    started_at: float,
    finished_at: float | None,
    steps: int,
    epoch: int,
    max_train_steps: int,
    num_epochs: int,
    num_batches_per_epoch: int,
    num_train_images: int,
    num_reg_images: int,
    tag_frequency: dict[str, Any],
    dataset_dirs: dict[str, Any],
    bucket_info: dict[str, Any] | None,
    base_model: BaseModel | None,
    num_processes: int = 1,
) -> dict[str, str]:
    """The ss_* and modelspec.* metadata sd-scripts writes into a LoRA (values are strings).

    `optimizer` is kohya's description of the optimizer built ("torch.optim.adamw.AdamW(weight_decay=0.01)");
    `max_train_steps` and `num_epochs` come from the plan; `finished_at` None means now (an intermediate save).
    The model-name/hash keys are left out when the base model is unknown, as sd-scripts does. With
    `num_processes` data-parallel processes, `num_batches_per_epoch` is per process and ss_total_batch_size counts
    every process's batch, as kohya under accelerate writes them.
    """
    finished = time.time() if finished_at is None else finished_at
    prediction = "v" if config.v_parameterization else "epsilon"
    width, height = config.resolution
    md = _training_keys(config, network, optimizer, num_processes)
    md.update(
        {
            "ss_session_id": str(session_id),
            "ss_training_started_at": str(started_at),
            "ss_training_finished_at": str(finished),
            "ss_output_name": config.output_stem,
            "ss_steps": str(steps),
            "ss_epoch": str(epoch),
            "ss_max_train_steps": str(max_train_steps),
            "ss_num_epochs": str(num_epochs),
            "ss_num_batches_per_epoch": str(num_batches_per_epoch),
            "ss_num_train_images": str(num_train_images),
            "ss_num_reg_images": str(num_reg_images),
            "ss_base_model_version": config.family.base_model_version_for(prediction),
            "ss_resolution": str((width, height)),
            "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_dataset_dirs": json.dumps(dataset_dirs),
            "ss_bucket_info": json.dumps(bucket_info),
        }
    )
    md.update(_model_keys(base_model))
    md.update(_modelspec_keys(config, prediction, finished))
    return md
