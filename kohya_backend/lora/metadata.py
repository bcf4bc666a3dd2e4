"""The training metadata kohya's sd-scripts stores in a LoRA file (ss_* and modelspec.* keys, all strings).

The WebUI, Forge and kohya's tools read these: the alias, which model family the Lora card is shown for,
the tag chips, the dataset summary, the bucket resolutions. Every key train_network.py writes is written, as
it writes it: `str()` of the Python value (so unset values read "None", switches "True"/"False", alpha as a float
"8.0"), JSON for the nested ones, in the same shapes (`ss_bucket_info` as {"buckets": {"0": {"resolution": [w, h],
"count": n}}, "mean_img_ar_error": x}, `ss_session_id` an integer, `ss_optimizer` the optimizer's class path).

Settings come from the typed config; what was built (the network, the optimizer) and what was planned (steps,
epochs, buckets) are passed in, so the file records what was trained rather than re-deriving it.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kohya_backend import __version__
from kohya_backend.config.train_config import TrainConfig

NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION = f"kohya_backend/{__version__}"  # what sd-scripts fills with "sd-scripts/<commit>"

# config keys written as str(value), in sd-scripts' order, under ss_<key>
_PLAIN_KEYS = (
    "gradient_accumulation_steps",
    "lr_warmup_steps",
    "lr_scheduler",
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
)
# config keys sd-scripts writes through bool(...)
_BOOL_KEYS = ("gradient_checkpointing", "cache_latents")
# kohya arguments this trainer refuses (schema.UNSUPPORTED) unless they are at kohya's default, which is therefore
# always their value here: sd-scripts writes them all the same
_NOT_IMPLEMENTED = {
    "full_fp16": False,
    "fp8_base": False,
    "fp8_base_unet": False,
    "face_crop_aug_range": None,
    "validation_seed": None,
    "validation_split": 0.0,
    "max_validation_steps": None,
    "validate_every_n_epochs": None,
    "validate_every_n_steps": None,
    "resize_interpolation": None,
}
# per-run dataset keys sd-scripts writes for a train_data_dir run (a dataset_config run writes ss_datasets)
_DATASET_BOOL_KEYS = (
    "color_aug",
    "flip_aug",
    "random_crop",
    "shuffle_caption",
    "enable_bucket",
    "bucket_no_upscale",
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
    given_args: Mapping[str, str] = field(default_factory=dict)  # the network_args as given, as strings

    def args(self) -> dict[str, str]:
        """kohya's ss_network_args: the network_args given, with LoCon's as the network was built."""
        out: dict[str, str] = dict(self.given_args)
        if self.conv_dim is not None:
            out["conv_dim"] = str(self.conv_dim)
            if self.conv_alpha is not None:
                out["conv_alpha"] = f"{self.conv_alpha:g}"
        return out


@dataclass(frozen=True)
class BaseModel:
    """The model a LoRA was trained on: its local path (None for a hub id, named by `name`) and kohya's hashes."""

    path: Path | None
    sha256: str | None = None
    legacy_hash: str | None = None
    name: str | None = None  # as given, when it is not a path here (a hub id)


@dataclass(frozen=True)
class DatasetInfo:
    """What the dataset looked like, as kohya records it: tag counts and folders (training and regularisation),
    the bucket info, and for a dataset_config run its ss_datasets entries (then the per-run dataset keys go)."""

    tag_frequency: dict[str, Any]
    dataset_dirs: dict[str, Any]
    reg_dataset_dirs: dict[str, Any] = field(default_factory=dict)
    bucket_info: dict[str, Any] | None = None
    datasets: list[dict[str, Any]] | None = None


def _training_keys(config: TrainConfig, network: NetworkSettings, optimizer: str) -> dict[str, str]:
    md = {f"ss_{key}": str(getattr(config, key)) for key in _PLAIN_KEYS}
    md.update({f"ss_{key}": str(bool(getattr(config, key))) for key in _BOOL_KEYS})
    md.update({f"ss_{key}": str(value) for key, value in _NOT_IMPLEMENTED.items()})
    md.update(
        {
            "ss_learning_rate": str(float(config.learning_rate)),
            "ss_text_encoder_lr": str(config.text_encoder_lr),  # the arguments as given, as sd-scripts writes
            "ss_unet_lr": str(config.unet_lr),
            "ss_optimizer": optimizer,
            "ss_network_module": network.module,
            "ss_network_dim": str(network.dim),
            "ss_network_alpha": str(float(network.alpha)),  # argparse reads a float
            "ss_network_dropout": str(network.dropout),
            "ss_v2": "False",
            "ss_debiased_estimation": str(bool(config.debiased_estimation_loss)),
            "ss_num_validation_images": "0",
            "ss_sd_scripts_commit_hash": IMPLEMENTATION,
        }
    )
    args = network.args()
    if args:
        md["ss_network_args"] = json.dumps(args)  # sd-scripts writes them only when set
    return md


def _dataset_keys(config: TrainConfig, dataset: DatasetInfo, num_processes: int) -> dict[str, str]:
    """A dataset_config run: ss_datasets and the merged tags and folders; a train_data_dir run: its settings (the
    total batch counts every data-parallel process's)."""
    if dataset.datasets is not None:
        return {
            "ss_datasets": json.dumps(dataset.datasets),
            "ss_tag_frequency": json.dumps(dataset.tag_frequency),
            "ss_dataset_dirs": json.dumps(dataset.dataset_dirs),
        }
    width, height = config.resolution
    md = {f"ss_{key}": str(bool(getattr(config, key))) for key in _DATASET_BOOL_KEYS}
    md.update(
        {
            "ss_batch_size_per_device": str(config.train_batch_size),
            "ss_total_batch_size": str(
                config.train_batch_size * num_processes * config.gradient_accumulation_steps
            ),
            "ss_resolution": str((width, height)),
            "ss_min_bucket_reso": str(config.min_bucket_reso),
            "ss_max_bucket_reso": str(config.max_bucket_reso),
            "ss_keep_tokens": str(config.keep_tokens),
            "ss_dataset_dirs": json.dumps(dataset.dataset_dirs),
            "ss_reg_dataset_dirs": json.dumps(dataset.reg_dataset_dirs),
            "ss_tag_frequency": json.dumps(dataset.tag_frequency),
            "ss_bucket_info": json.dumps(dataset.bucket_info),
        }
    )
    return md


def _model_keys(base_model: BaseModel | None) -> dict[str, str]:
    """kohya's model keys: hashes and the file name when the model is a path here; the name as given otherwise."""
    md: dict[str, str] = {}
    if base_model is None:
        return md
    if base_model.name is not None:
        md["ss_sd_model_name"] = base_model.name
    elif base_model.path is not None:
        md["ss_sd_model_name"] = Path(base_model.path).name
    if base_model.legacy_hash:
        md["ss_sd_model_hash"] = base_model.legacy_hash
    if base_model.sha256:
        md["ss_new_sd_model_hash"] = base_model.sha256
    return md


def _modelspec_keys(config: TrainConfig, prediction: str, when: float) -> dict[str, str]:
    width, height = config.resolution
    md = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": config.family.modelspec_architecture,
        "modelspec.implementation": config.family.modelspec_implementation,
        "modelspec.title": config.output_stem,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(when)).isoformat(),
        "modelspec.prediction_type": prediction,
        "modelspec.implementation_version": IMPLEMENTATION,
    }
    low, high = config.min_timestep, config.max_timestep
    if low is not None or high is not None:
        md["modelspec.timestep_range"] = (
            f"{low if low is not None else 0},{high if high is not None else 1000}"
        )
    if config.clip_skip is not None:
        md["modelspec.encoder_layer"] = str(config.clip_skip)
    return md


def training_metadata(
    *,
    config: TrainConfig,
    network: NetworkSettings,
    optimizer: str,
    session_id: int | str,
    started_at: float,
    finished_at: float | None,
    steps: int,
    epoch: int,
    max_train_steps: int,
    num_epochs: int,
    num_batches_per_epoch: int,
    num_train_images: int,
    num_reg_images: int,
    dataset: DatasetInfo,
    base_model: BaseModel | None,
    num_processes: int = 1,
) -> dict[str, str]:
    """The ss_* and modelspec.* metadata sd-scripts' train_network.py writes into a LoRA (values are strings).

    `optimizer` is kohya's description of the optimizer built ("torch.optim.adamw.AdamW(weight_decay=0.01)");
    `max_train_steps` and `num_epochs` come from the plan; `finished_at` None means now (an intermediate save).
    The model-name/hash keys are left out when the base model is unknown, as sd-scripts does. With
    `num_processes` data-parallel processes, `num_batches_per_epoch` is per process and ss_total_batch_size counts
    every process's batch, as kohya under accelerate writes them.
    """
    finished = time.time() if finished_at is None else finished_at
    prediction = "v" if config.v_parameterization else "epsilon"
    md = _training_keys(config, network, optimizer)
    md.update(
        {
            "ss_session_id": str(session_id),
            "ss_training_started_at": str(started_at),
            "ss_output_name": config.output_stem,
            "ss_num_train_images": str(num_train_images),
            "ss_num_reg_images": str(num_reg_images),
            "ss_num_batches_per_epoch": str(num_batches_per_epoch),
            "ss_num_epochs": str(num_epochs),
            "ss_max_train_steps": str(max_train_steps),
            "ss_base_model_version": config.family.base_model_version_for(prediction),
            "ss_training_finished_at": str(finished),
            "ss_steps": str(steps),
            "ss_epoch": str(epoch),
        }
    )
    md.update(_dataset_keys(config, dataset, num_processes))
    md.update(_model_keys(base_model))
    md.update(_modelspec_keys(config, prediction, finished))
    return md
