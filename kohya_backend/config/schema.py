"""The config_params schema: every kohya sd-scripts key this trainer implements, with types, defaults per FM type,
ranges and allowed values, plus the kohya keys it knowingly does not implement.

Validation, formatting, the UI's defaults and the config reference are all derived from this one table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import tomlkit

from kohya_backend.config.lycoris_args import LYCORIS_MODULE
from kohya_backend.config.optimizers import BUILTIN_OPTIMIZERS
from kohya_backend.errors import ConfigError, ConfigIssue

FM_TYPES: tuple[str, ...] = ("sd_1_5", "sd_xl")

# kohya's own optimizer names; optimizer_type may also name a class (config/optimizers.py)
OPTIMIZERS: tuple[str, ...] = tuple(BUILTIN_OPTIMIZERS)
NETWORK_MODULES: tuple[str, ...] = ("networks.lora", LYCORIS_MODULE)
LOSS_TYPES: tuple[str, ...] = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES: tuple[str, ...] = ("snr", "exponential", "constant")
LR_SCHEDULERS: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "adafactor",
)

# kohya's sample_sampler names -> the diffusers scheduler class that implements each (and its extra settings).
SAMPLE_SAMPLERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType(
    {
        "ddim": ("DDIMScheduler", {}),
        "pndm": ("PNDMScheduler", {}),
        "lms": ("LMSDiscreteScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "heun": ("HeunDiscreteScheduler", {}),
        "dpm_2": ("KDPM2DiscreteScheduler", {}),
        "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
        "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
        "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
        "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
        "k_lms": ("LMSDiscreteScheduler", {}),
        "k_euler": ("EulerDiscreteScheduler", {}),
        "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
        "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    }
)

# The network_args this trainer implements for networks.lora (kohya's LoCon extension); lycoris.kohya reads its
# own (config/lycoris_args.py).
NETWORK_ARGS: tuple[str, ...] = ("conv_dim", "conv_alpha")


@dataclass(frozen=True)
class KeySpec:
    """One config_params key: its kind, default (per FM type), limits and help, as the whole project sees it.

    Kinds: bool, int, float, str, path, list ("k=v" strings), resolution ("w,h"), steps_or_fraction.
    `zero_is_unset` marks keys where kohya reads 0 as "off": 0 is normalised to None (unset).
    """

    name: str
    kind: str
    default: Any
    group: str
    help: str
    fm_defaults: Mapping[str, Any] = field(default_factory=dict)
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    exclusive_minimum: bool = False
    zero_is_unset: bool = False

    def default_for(self, fm_type: str) -> Any:
        """The default of this key for one FM type."""
        return self.fm_defaults.get(fm_type, self.default)


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


def _spec(name: str, kind: str, default: Any, group: str, help: str, **extra: Any) -> KeySpec:
    return KeySpec(name=name, kind=kind, default=default, group=group, help=help, **extra)


# fmt: off
_SPECS: list[KeySpec] = [
    # model
    _spec("pretrained_model_name_or_path", "path", None, "model",
          "Base checkpoint to train on: a single-file SD 1.5 or SDXL .safetensors/.ckpt."),
    _spec("v2", "bool", False, "model",
          "kohya's switch for Stable Diffusion 2.x; SD 2.x is not trained here, so it must stay false."),
    _spec("v_parameterization", "bool", False, "model",
          "Train with v-prediction loss; only for v-prediction base checkpoints."),
    _spec("no_half_vae", "bool", False, "model",
          "Keep the VAE in float32 under mixed precision (SDXL's VAE gives NaN/black images in fp16).",
          fm_defaults={"sd_xl": True}),
    _spec("tokenizer_cache_dir", "path", None, "model",
          "Folder with a saved CLIP tokenizer, used offline instead of the Hugging Face hub."),
    # dataset
    _spec("train_data_dir", "path", None, "dataset",
          "Parent folder of <repeats>_<name> image folders (e.g. 10_mychar)."),
    _spec("reg_data_dir", "path", None, "dataset",
          "Parent folder of <repeats>_<name> regularisation image folders (optional)."),
    _spec("prior_loss_weight", "float", 1.0, "dataset",
          "Loss weight of regularisation images.", minimum=0.0),
    _spec("caption_extension", "str", ".caption", "dataset",
          "Extension of the caption file next to each image (the GUIs use .txt)."),
    _spec("shuffle_caption", "bool", False, "dataset",
          "Shuffle the comma-separated tags of each caption."),
    _spec("keep_tokens", "int", 0, "dataset",
          "Keep the first N comma-separated tags in place when shuffling.", minimum=0, maximum=256),
    _spec("keep_tokens_separator", "str", "", "dataset",
          "Tags before this separator stay in place when shuffling (overrides keep_tokens)."),
    _spec("caption_prefix", "str", None, "dataset",
          "Text added before every caption."),
    _spec("caption_suffix", "str", None, "dataset",
          "Text added after every caption."),
    _spec("caption_dropout_rate", "float", 0.0, "dataset",
          "Probability of training an image with an empty caption.", minimum=0.0, maximum=1.0),
    _spec("caption_dropout_every_n_epochs", "int", 0, "dataset",
          "Drop all captions every N epochs (0 = never).", minimum=0),
    _spec("caption_tag_dropout_rate", "float", 0.0, "dataset",
          "Probability of dropping each comma-separated tag.", minimum=0.0, maximum=1.0),
    _spec("flip_aug", "bool", False, "dataset",
          "Randomly flip images horizontally."),
    _spec("random_crop", "bool", False, "dataset",
          "Crop randomly instead of centred (not with cache_latents)."),
    # buckets
    _spec("resolution", "resolution", (512, 512), "buckets",
          'Training resolution: one size (512) or width,height ("512,768").',
          fm_defaults={"sd_xl": (1024, 1024)}, minimum=64, maximum=4096),
    _spec("enable_bucket", "bool", False, "buckets",
          "Group images into aspect-ratio buckets."),
    _spec("min_bucket_reso", "int", 256, "buckets",
          "Smallest bucket side in pixels.", minimum=64, maximum=4096),
    _spec("max_bucket_reso", "int", 1024, "buckets",
          "Largest bucket side in pixels.", minimum=64, maximum=8192),
    _spec("bucket_reso_steps", "int", 64, "buckets",
          "Bucket side step in pixels: a multiple of 64 for SD 1.5, of 32 for SDXL.",
          minimum=32, maximum=1024),
    _spec("bucket_no_upscale", "bool", False, "buckets",
          "Never upscale an image to fit its bucket."),
    # caching
    _spec("cache_latents", "bool", False, "caching",
          "Encode every image with the VAE once, before training."),
    _spec("cache_latents_to_disk", "bool", False, "caching",
          "Keep the latent cache on disk next to the images (implies cache_latents)."),
    _spec("vae_batch_size", "int", None, "caching",
          "Batch size when caching latents (unset = 1 on the CPU, where single images run fastest; on a GPU chosen from the resolution: 8 at 256 px, 4 at 512, 1 at 1024).", minimum=1, maximum=256),
    _spec("cache_text_encoder_outputs", "bool", False, "caching",
          "Encode captions once before training (needs network_train_unet_only; no caption shuffle/dropout)."),
    _spec("cache_text_encoder_outputs_to_disk", "bool", False, "caching",
          "Keep the text encoder cache on disk (implies cache_text_encoder_outputs)."),
    _spec("max_data_loader_n_workers", "int", 8, "caching",
          "Data loader worker processes (0 = load in the training process).", minimum=0, maximum=64),
    _spec("persistent_data_loader_workers", "bool", False, "caching",
          "Keep data loader workers alive between epochs (needs max_data_loader_n_workers > 0)."),
    # network
    _spec("network_module", "str", "networks.lora", "network",
          "Network type: kohya's networks.lora (LoRA, LoCon with conv_dim) or lycoris.kohya (LyCORIS through "
          "lycoris-lora: network_args algo=locon|loha|lokr|ia3|dylora|glora|diag-oft|full, preset, ...).",
          choices=NETWORK_MODULES),
    _spec("network_dim", "int", 4, "network",
          "LoRA rank.", minimum=1, maximum=1024),
    _spec("network_alpha", "float", 1.0, "network",
          "LoRA alpha: the update is scaled by alpha/rank (0 = same as network_dim).", minimum=0.0),
    _spec("network_args", "list", [], "network",
          'Extra network settings as "key=value" strings: conv_dim and conv_alpha (LoCon) for networks.lora; '
          "for lycoris.kohya the arguments lycoris-lora reads (algo, preset, conv_dim, conv_alpha, factor, ...)."),
    _spec("network_dropout", "float", None, "network",
          "Dropout on the LoRA down projection (0 or unset = none).",
          minimum=0.0, maximum=1.0, zero_is_unset=True),
    _spec("network_weights", "path", None, "network",
          "Start from the weights of an existing LoRA file."),
    _spec("network_train_unet_only", "bool", False, "network",
          "Train only the U-Net LoRA."),
    _spec("network_train_text_encoder_only", "bool", False, "network",
          "Train only the text encoder LoRA."),
    _spec("training_comment", "str", None, "network",
          "Free text stored in the LoRA's metadata."),
    _spec("scale_weight_norms", "float", None, "network",
          "Max-norm regularisation: after each step, scale down every module whose update norm exceeds this "
          "(1 is a usual start; 0 or unset = off).", minimum=0.0, exclusive_minimum=True, zero_is_unset=True),
    # optimizer
    _spec("optimizer_type", "str", "AdamW", "optimizer",
          "Optimizer: one of kohya's names, a torch.optim class (RAdam) or a class path of an installed optimizer "
          "package (pytorch_optimizer.CAME, came_pytorch.CAME, prodigyplus.ProdigyPlusScheduleFree)."),
    _spec("optimizer_args", "list", [], "optimizer",
          'Extra optimizer settings as "key=value" strings with Python literal values (weight_decay=0.01).'),
    _spec("learning_rate", "float", 2e-06, "optimizer",
          "Learning rate; also used for unet_lr/text_encoder_lr when they are unset.",
          minimum=0.0, exclusive_minimum=True),
    _spec("unet_lr", "float", None, "optimizer",
          "Learning rate of the U-Net LoRA.", minimum=0.0),
    _spec("text_encoder_lr", "float", None, "optimizer",
          "Learning rate of the text encoder LoRA (0 = do not train it).", minimum=0.0),
    _spec("lr_scheduler", "str", "constant", "optimizer",
          "Learning rate schedule.", choices=LR_SCHEDULERS),
    _spec("lr_warmup_steps", "steps_or_fraction", 0, "optimizer",
          "Warmup steps, or a fraction of all steps when below 1 (0.05 = 5%)."),
    _spec("lr_scheduler_num_cycles", "int", 1, "optimizer",
          "Restarts of cosine_with_restarts.", minimum=1, maximum=1000),
    _spec("lr_scheduler_power", "float", 1.0, "optimizer",
          "Power of the polynomial schedule.", minimum=0.0, exclusive_minimum=True),
    _spec("lr_scheduler_args", "list", [], "optimizer",
          'Extra scheduler settings as "key=value" strings with Python literal values.'),
    _spec("lr_scheduler_type", "str", None, "optimizer",
          "A scheduler class instead of lr_scheduler: a torch.optim.lr_scheduler name (CosineAnnealingLR) or a "
          "class path, built with lr_scheduler_args (no lr_warmup_steps)."),
    _spec("max_grad_norm", "float", 1.0, "optimizer",
          "Gradient clipping norm (0 = no clipping).", minimum=0.0),
    # training
    _spec("train_batch_size", "int", 1, "training",
          "Images per step.", minimum=1, maximum=256),
    _spec("max_train_steps", "int", 1600, "training",
          "Total optimizer steps (max_train_epochs overrides it).", minimum=1, maximum=10_000_000),
    _spec("max_train_epochs", "int", None, "training",
          "Train for this many epochs (overrides max_train_steps).",
          minimum=1, maximum=100_000, zero_is_unset=True),
    _spec("gradient_accumulation_steps", "int", 1, "training",
          "Batches accumulated per optimizer step.", minimum=1, maximum=1024),
    _spec("gradient_checkpointing", "bool", False, "training",
          "Recompute activations to save memory."),
    _spec("mixed_precision", "str", "no", "training",
          "Mixed precision: no, fp16 (CUDA only) or bf16.", choices=("no", "fp16", "bf16")),
    _spec("seed", "int", None, "training",
          "Random seed (unset = random).", minimum=0, maximum=2**32 - 1),
    _spec("clip_skip", "int", None, "training",
          "Use the output of the Nth-from-last text encoder layer (SD 1.5; ignored on SDXL as in kohya).",
          minimum=1, maximum=12),
    _spec("max_token_length", "int", 75, "training",
          "Caption token limit (long captions are encoded in 75-token chunks).", choices=(75, 150, 225)),
    _spec("noise_offset", "float", None, "training",
          "Noise offset strength (about 0.05-0.1; 0 = off).", minimum=0.0, maximum=1.0, zero_is_unset=True),
    _spec("min_snr_gamma", "float", None, "training",
          "Min-SNR loss weighting gamma (5 is typical; 0 = off).",
          minimum=0.0, maximum=100.0, exclusive_minimum=True, zero_is_unset=True),
    _spec("min_timestep", "int", None, "training",
          "Smallest diffusion timestep trained (0-999).", minimum=0, maximum=999),
    _spec("max_timestep", "int", None, "training",
          "Largest diffusion timestep trained, exclusive (1-1000).", minimum=1, maximum=1000),
    # noise and loss variants
    _spec("noise_offset_random_strength", "bool", False, "noise",
          "Draw the noise offset strength uniformly between 0 and noise_offset each step."),
    _spec("adaptive_noise_scale", "float", None, "noise",
          "Add this times the absolute latent mean (per channel) to noise_offset (needs noise_offset).",
          minimum=-1.0, maximum=1.0, zero_is_unset=True),
    _spec("multires_noise_iterations", "int", None, "noise",
          "Multires (pyramid) noise levels (6-10 is usual; 0 or unset = off).",
          minimum=1, maximum=64, zero_is_unset=True),
    _spec("multires_noise_discount", "float", 0.3, "noise",
          "Weight decay per multires noise level.", minimum=0.0, maximum=1.0),
    _spec("ip_noise_gamma", "float", None, "noise",
          "Input perturbation noise strength (about 0.1; 0 or unset = off).",
          minimum=0.0, maximum=1.0, zero_is_unset=True),
    _spec("ip_noise_gamma_random_strength", "bool", False, "noise",
          "Draw the input perturbation strength uniformly between 0 and ip_noise_gamma each step."),
    _spec("zero_terminal_snr", "bool", False, "noise",
          "Rescale the noise schedule so the last timestep is pure noise (meant for v-prediction)."),
    _spec("loss_type", "str", "l2", "noise",
          "Loss: l2 (MSE), l1, huber or smooth_l1.", choices=LOSS_TYPES),
    _spec("huber_schedule", "str", "snr", "noise",
          "How the Huber threshold follows the timestep (huber and smooth_l1 only).", choices=HUBER_SCHEDULES),
    _spec("huber_c", "float", 0.1, "noise",
          "Huber threshold (huber and smooth_l1 only).", minimum=0.0, maximum=10.0, exclusive_minimum=True),
    _spec("huber_scale", "float", 1.0, "noise",
          "Huber threshold scale of the exponential and constant schedules.",
          minimum=0.0, maximum=100.0, exclusive_minimum=True),
    _spec("debiased_estimation_loss", "bool", False, "noise",
          "Weight the loss by 1/sqrt(SNR) (1/(SNR+1) for v-prediction)."),
    _spec("scale_v_pred_loss_like_noise_pred", "bool", False, "noise",
          "Scale a v-prediction loss by SNR/(SNR+1), like a noise-prediction loss (needs v_parameterization)."),
    _spec("v_pred_like_loss", "float", None, "noise",
          "Add a v-prediction-like loss term with this weight (not with v_parameterization).",
          minimum=0.0, maximum=100.0, zero_is_unset=True),
    # saving
    _spec("output_dir", "path", None, "saving",
          "Folder for the LoRA files."),
    _spec("output_name", "str", None, "saving",
          "File name of the LoRA without extension (kohya writes last.safetensors when unset)."),
    _spec("save_model_as", "str", "safetensors", "saving",
          "File format; only safetensors.", choices=("safetensors",)),
    _spec("save_precision", "str", "float", "saving",
          "Precision of the saved LoRA: fp16, bf16 or float (kohya's unset = float).",
          choices=("fp16", "bf16", "float")),
    _spec("save_every_n_epochs", "int", None, "saving",
          "Also save a LoRA every N epochs.", minimum=1, maximum=100_000, zero_is_unset=True),
    _spec("save_every_n_steps", "int", None, "saving",
          "Also save a LoRA every N steps.", minimum=1, maximum=10_000_000, zero_is_unset=True),
    _spec("save_n_epoch_ratio", "int", None, "saving",
          "Save about N files over the run (sets save_every_n_epochs = epochs // N).",
          minimum=1, maximum=100_000, zero_is_unset=True),
    _spec("save_last_n_epochs", "int", None, "saving",
          "Keep only the last N per-epoch files (needs save_every_n_epochs).",
          minimum=1, maximum=100_000, zero_is_unset=True),
    _spec("save_state", "bool", False, "saving",
          "Also save a resumable training state with each LoRA."),
    _spec("save_state_on_train_end", "bool", False, "saving",
          "Save a resumable training state at the end."),
    _spec("resume", "path", None, "saving",
          "Resume from a saved training state folder."),
    _spec("logging_dir", "path", None, "saving",
          "Folder for training logs."),
    _spec("log_prefix", "str", None, "saving",
          "Prefix of the log folder name."),
    # sampling
    _spec("sample_prompts", "path", None, "sampling",
          "File with one sample prompt per line (kohya syntax)."),
    _spec("sample_every_n_epochs", "int", None, "sampling",
          "Generate samples every N epochs.", minimum=1, maximum=100_000, zero_is_unset=True),
    _spec("sample_every_n_steps", "int", None, "sampling",
          "Generate samples every N steps.", minimum=1, maximum=10_000_000, zero_is_unset=True),
    _spec("sample_sampler", "str", "ddim", "sampling",
          "Sampler for sample images.", choices=tuple(SAMPLE_SAMPLERS)),
    # compat
    _spec("xformers", "bool", False, "compat",
          "Accepted for compatibility: this trainer always uses PyTorch scaled-dot-product attention."),
    _spec("sdpa", "bool", False, "compat",
          "Accepted for compatibility: PyTorch scaled-dot-product attention is always used."),
    _spec("mem_eff_attn", "bool", False, "compat",
          "Accepted for compatibility: PyTorch scaled-dot-product attention is always used."),
    _spec("lowram", "bool", False, "compat",
          "Accepted for compatibility: memory is managed by this trainer."),
    _spec("highvram", "bool", False, "compat",
          "Accepted for compatibility: memory is managed by this trainer."),
]
# fmt: on

SCHEMA: dict[str, KeySpec] = {spec.name: spec for spec in _SPECS}

# Keys kohya reads under another name: old name -> canonical name (the canonical TOML writes the new one).
ALIASES: dict[str, str] = {
    "caption_extention": "caption_extension",  # kohya's own misspelt alias
    "lr_restart_cycles": "lr_scheduler_num_cycles",  # written by the AWS solution's kohya templates
}

# Keys that kohya_ss's GUI writes but sd-scripts does not read: a pointer to what to use instead.
GUI_KEY_HINTS: dict[str, str] = {
    "epoch": "use max_train_epochs",
    "conv_dim": 'use network_args = ["conv_dim=N", "conv_alpha=A"]',
    "conv_alpha": 'use network_args = ["conv_dim=N", "conv_alpha=A"]',
    "lora_type": "this trainer trains standard LoRA (networks.lora); remove it",
    "lycoris_preset": 'use network_module = "lycoris.kohya" with network_args = ["preset=full", ...]',
    "additional_parameters": "write each parameter as its own key",
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
            "offload_param_nvme_path zero3_init_flag zero3_save_16bit_model fp16_master_weights_and_gradients "
            "ddp_timeout ddp_gradient_as_bucket_view ddp_static_graph",
            "multi-GPU and DeepSpeed training are not implemented; remove it",
        ),
        (
            "log_with log_tracker_name log_tracker_config wandb_run_name wandb_api_key log_config "
            "console_log_level console_log_file console_log_simple",
            "progress goes to the job's log and events; remove it (logging_dir is supported)",
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
            "dataset_config in_json dataset_class dataset_repeats",
            "this trainer reads kohya's folder layout only: remove it and set train_data_dir to the parent of "
            "<repeats>_<name> folders",
        ),
        (
            "color_aug face_crop_aug_range",
            "this augmentation is not implemented; remove it (flip_aug and random_crop are supported)",
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
    out: dict[str, Any] = {}
    for name, spec in SCHEMA.items():
        value = spec.default_for(fm_type)
        out[name] = list(value) if isinstance(value, list) else value
    return out


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

_TEMPLATE_FM: dict[str, dict[str, Any]] = {
    "sd_1_5": {"resolution": (512, 512), "clip_skip": 2},
    "sd_xl": {"resolution": (1024, 1024), "no_half_vae": True},
}


def template_values(fm_type: str) -> dict[str, Any]:
    """The AWS solution's starting config for an FM type, with the paths left empty for the user."""
    check_fm_type(fm_type)
    return {**_TEMPLATE_COMMON, **_TEMPLATE_FM[fm_type]}


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
