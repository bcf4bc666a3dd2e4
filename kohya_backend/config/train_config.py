"""The typed, frozen TrainConfig: one field per config_params key, each declared once with its type, default, limits,
help and effect (`key()`); the schema table (SCHEMA) is read off these declarations.

Adding a key is one field here (plus the code that uses it, and its behaviour test in tests/test_config_effects.py).
Validation (`validate.validate_config`) is the only way to build one; the trainer, metadata and plan read fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kohya_backend.config.choices import (
    HUBER_SCHEDULES,
    LOSS_TYPES,
    LR_SCHEDULERS,
    NETWORK_MODULES,
    SAMPLE_SAMPLER_CHOICES,
)
from kohya_backend.config.keys import KeySpec, compat, fixed, key, specs_of, used
from kohya_backend.config.values import kv_dict, literal_kwargs
from kohya_backend.errors import ConfigIssue
from kohya_backend.families import Family, family_for
from kohya_backend.job_folder import output_stem, state_dir_for

_SDPA = (
    "is accepted for kohya compatibility, but this trainer always uses PyTorch scaled-dot-product attention"
)
_MEMORY = "has no effect here: this trainer manages memory itself"
_LOADER = (
    "is accepted for kohya compatibility and changes nothing: this trainer has no data loader worker processes "
    "(images are read in the training process; cache_latents reads each image once)"
)
# Keys that make an image's caption differ from one draw to the next.
CAPTION_VARIATION_KEYS = (
    "shuffle_caption",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "caption_dropout_every_n_epochs",
)


@dataclass(frozen=True)
class TrainConfig:
    """A validated config: every key with its normalised value (None = unset), the FM type, and the warnings found."""

    fm_type: str
    # fmt: off
    # model
    pretrained_model_name_or_path: str | None = key(
        None, "model", "Base checkpoint to train on: a single-file SD 1.5 or SDXL .safetensors/.ckpt.",
        used("training", "models/load.py: the weights trained on"), kind="path")
    v2: bool = key(
        False, "model", "kohya's switch for Stable Diffusion 2.x; SD 2.x is not trained here, so it must stay false.",
        fixed("false: SD 1.5 or SDXL, never SD 2.x"))
    v_parameterization: bool = key(
        False, "model", "Train with v-prediction loss; only for v-prediction base checkpoints.",
        used("training", "train/noise.py: the loss target is the velocity"))
    no_half_vae: bool = key(
        False, "model", "Keep the VAE in float32 under mixed precision (SDXL's VAE gives NaN/black images in fp16).",
        used("training", "train/setup.py: the VAE's dtype when the weights are half precision"))
    tokenizer_cache_dir: str | None = key(
        None, "model", "Folder with a saved CLIP tokenizer, used offline instead of the Hugging Face hub.",
        used("training", "models/tokenizers.py: the tokenizer captions are encoded with"), kind="path")
    # dataset
    train_data_dir: str | None = key(
        None, "dataset", "Parent folder of <repeats>_<name> image folders (e.g. 10_mychar).",
        used("training", "data/scan.py: the images trained on"), kind="path")
    dataset_config: str | None = key(
        None, "dataset",
        "kohya's dataset TOML ([general], [[datasets]], [[datasets.subsets]]); train_data_dir and reg_data_dir are "
        "ignored when it is set, as in kohya.",
        used("training", "data/dataset_config.py: the images, with per-dataset buckets and batch size and "
             "per-subset caption and augmentation options"), kind="path")
    reg_data_dir: str | None = key(
        None, "dataset", "Parent folder of <repeats>_<name> regularisation image folders (optional).",
        used("training", "data/scan.py: regularisation images mixed into each epoch"), kind="path")
    prior_loss_weight: float = key(
        1.0, "dataset", "Loss weight of regularisation images.",
        used("training", "train/noise.py: the loss weight of regularisation images"), minimum=0.0)
    caption_extension: str = key(
        ".caption", "dataset", "Extension of the caption file next to each image (the GUIs use .txt).",
        used("captions", "data/scan.py: which file holds each image's caption"))
    shuffle_caption: bool = key(
        False, "dataset", "Shuffle the comma-separated tags of each caption.",
        used("captions", "data/captions.py: tag order"))
    keep_tokens: int = key(
        0, "dataset", "Keep the first N comma-separated tags in place when shuffling.",
        used("captions", "data/captions.py: tags kept in front"), minimum=0, maximum=256)
    keep_tokens_separator: str = key(
        "", "dataset", "Tags before this separator stay in place when shuffling (overrides keep_tokens).",
        used("captions", "data/captions.py: tags kept in front"))
    caption_prefix: str | None = key(
        None, "dataset", "Text added before every caption.", used("captions", "data/captions.py"))
    caption_suffix: str | None = key(
        None, "dataset", "Text added after every caption.", used("captions", "data/captions.py"))
    caption_dropout_rate: float = key(
        0.0, "dataset", "Probability of training an image with an empty caption.",
        used("captions", "data/captions.py: empty captions"), minimum=0.0, maximum=1.0)
    caption_dropout_every_n_epochs: int = key(
        0, "dataset", "Drop all captions every N epochs (0 = never).",
        used("captions", "data/captions.py: empty captions every N epochs"), minimum=0)
    caption_tag_dropout_rate: float = key(
        0.0, "dataset", "Probability of dropping each comma-separated tag.",
        used("captions", "data/captions.py: dropped tags"), minimum=0.0, maximum=1.0)
    flip_aug: bool = key(
        False, "dataset", "Randomly flip images horizontally.",
        used("training", "train/inputs.py: mirrored images"))
    color_aug: bool = key(
        False, "dataset",
        "Weak color augmentation as kohya's: a third of the images get a small hue shift or gamma change (not with "
        "cache_latents).",
        used("training", "data/augment.py: hue or gamma changed"))
    random_crop: bool = key(
        False, "dataset", "Crop randomly instead of centred (not with cache_latents).",
        used("training", "data/buckets.py: where images are cropped"))
    # buckets
    resolution: tuple[int, int] = key(
        (512, 512), "buckets", 'Training resolution: one size (512) or width,height ("512,768").',
        used("buckets", "data/buckets.py: the training size / bucket area"),
        kind="resolution", minimum=64, maximum=4096)
    enable_bucket: bool = key(
        False, "buckets", "Group images into aspect-ratio buckets.", used("buckets", "data/buckets.py"))
    min_bucket_reso: int = key(
        256, "buckets", "Smallest bucket side in pixels.", used("buckets", "data/buckets.py"),
        minimum=64, maximum=4096)
    max_bucket_reso: int = key(
        1024, "buckets", "Largest bucket side in pixels.", used("buckets", "data/buckets.py"),
        minimum=64, maximum=8192)
    bucket_reso_steps: int = key(
        64, "buckets",
        "Bucket side step in pixels: a multiple of 64 for SD 1.5, of 32 for SDXL (checked with enable_bucket).",
        used("buckets", "data/buckets.py"), minimum=1, maximum=1024)
    bucket_no_upscale: bool = key(
        False, "buckets", "Never upscale an image to fit its bucket.", used("buckets", "data/buckets.py"))
    # caching
    cache_latents: bool = key(
        False, "caching", "Encode every image with the VAE once, before training.",
        used("training", "train/inputs.py: latents drawn once instead of each step"))
    cache_latents_to_disk: bool = key(
        False, "caching", "Keep the latent cache on disk next to the images (implies cache_latents).",
        used("files", "train/inputs.py: <image folder>/.latent_cache/"))
    vae_batch_size: int | None = key(
        None, "caching",
        "Batch size when caching latents (unset = 1 on the CPU, where single images run fastest; on a GPU chosen "
        "from the resolution: 8 at 256 px, 4 at 512, 1 at 1024; 0 = 1 image at a time, as in kohya).",
        used("caching", "train/inputs.py: images per VAE call while caching"), minimum=0, maximum=256)
    cache_text_encoder_outputs: bool = key(
        False, "caching",
        "Encode captions once before training (needs network_train_unet_only; no caption shuffle/dropout).",
        used("caching", "train/inputs.py: every caption encoded before the first step"))
    cache_text_encoder_outputs_to_disk: bool = key(
        False, "caching",
        "Keep the text encoder cache on disk, reused by later runs with the same model and settings (implies "
        "cache_text_encoder_outputs).",
        used("files", "train/inputs.py: <train_data_dir>/.text_encoder_cache/"))
    max_data_loader_n_workers: int = key(
        8, "caching", "Accepted for kohya compatibility, with a warning: this trainer has no data loader workers.",
        compat(_LOADER), minimum=0, maximum=64)
    persistent_data_loader_workers: bool = key(
        False, "caching", "Accepted for kohya compatibility, with a warning: this trainer has no data loader workers.",
        compat(_LOADER))
    # network
    network_module: str = key(
        "networks.lora", "network",
        "Network type: kohya's networks.lora (LoRA, LoCon with conv_dim) or lycoris.kohya (LyCORIS through "
        "lycoris-lora: network_args algo=locon|loha|lokr|ia3|dylora|glora|diag-oft|full, preset, ...).",
        used("training", "lora/build.py: LoRA or a LyCORIS network"), choices=NETWORK_MODULES)
    network_dim: int = key(
        4, "network", "LoRA rank.", used("training", "lora/network.py: the rank"), minimum=1)
    network_alpha: float = key(
        1.0, "network", "LoRA alpha: the update is scaled by alpha/rank (0 = same as network_dim).",
        used("training", "lora/network.py: the update's scale"), minimum=0.0)
    network_args: tuple[str, ...] = key(
        (), "network",
        'Extra network settings as "key=value" strings: conv_dim and conv_alpha (LoCon), rank_dropout and '
        "module_dropout for networks.lora; for lycoris.kohya the arguments lycoris-lora reads (algo, preset, "
        "conv_dim, conv_alpha, factor, ...).",
        used("training", "lora/network.py, lora/lycoris.py: LoCon, rank/module dropout, the LyCORIS algorithm and "
             "its settings"),
        kind="list")
    network_dropout: float | None = key(
        None, "network", "Dropout on the LoRA down projection (0 or unset = none).",
        used("training", "lora/network.py: dropout"), minimum=0.0, maximum=1.0, zero_is_unset=True)
    network_weights: str | None = key(
        None, "network", "Start from the weights of an existing LoRA file.",
        used("training", "lora/save.py: the starting weights"), kind="path")
    network_train_unet_only: bool = key(
        False, "network", "Train only the U-Net LoRA.", used("training", "lora/network.py: parts trained"))
    network_train_text_encoder_only: bool = key(
        False, "network", "Train only the text encoder LoRA.", used("training", "lora/network.py: parts trained"))
    training_comment: str | None = key(
        None, "network", "Free text stored in the LoRA's metadata (ss_training_comment).",
        used("metadata", "lora/metadata.py: ss_training_comment"))
    scale_weight_norms: float | None = key(
        None, "network",
        "Max-norm regularisation: after each step, scale down every module whose update norm exceeds this (1 is a "
        "usual start; 0 or unset = off).",
        used("training", "lora/max_norm.py: LoRA updates scaled down after each step"),
        minimum=0.0, exclusive_minimum=True, zero_is_unset=True)
    # optimizer
    optimizer_type: str = key(
        "AdamW", "optimizer",
        "Optimizer: one of kohya's names, a torch.optim class (RAdam) or a class path of an installed optimizer "
        "package (pytorch_optimizer.CAME, came_pytorch.CAME, prodigyplus.ProdigyPlusScheduleFree).",
        used("training", "train/optim.py, train/optimizers_extra.py"))
    optimizer_args: tuple[str, ...] = key(
        (), "optimizer",
        'Extra optimizer settings as "key=value" strings with Python literal values (weight_decay=0.01, '
        "betas=0.9,0.99).",
        used("training", "train/optim.py: the optimizer's keyword arguments"), kind="list")
    learning_rate: float = key(
        2e-06, "optimizer", "Learning rate; also used for unet_lr/text_encoder_lr when they are unset.",
        used("training", "train/optim.py"), minimum=0.0, exclusive_minimum=True)
    unet_lr: float | None = key(
        None, "optimizer", "Learning rate of the U-Net LoRA.", used("training", "train/optim.py"), minimum=0.0)
    text_encoder_lr: float | None = key(
        None, "optimizer", "Learning rate of the text encoder LoRA (0 = do not train it).",
        used("training", "train/optim.py"), minimum=0.0)
    lr_scheduler: str = key(
        "constant", "optimizer", "Learning rate schedule.", used("training", "train/optim.py"),
        choices=LR_SCHEDULERS)
    lr_warmup_steps: int | float = key(
        0, "optimizer", "Warmup steps, or a fraction of all steps when below 1 (0.05 = 5%).",
        used("training", "train/optim.py"), kind="steps_or_fraction")
    lr_scheduler_num_cycles: int = key(
        1, "optimizer", "Restarts of cosine_with_restarts.", used("training", "train/optim.py"),
        minimum=1, maximum=1000)
    lr_scheduler_power: float = key(
        1.0, "optimizer", "Power of the polynomial schedule.", used("training", "train/optim.py"),
        minimum=0.0, exclusive_minimum=True)
    lr_scheduler_args: tuple[str, ...] = key(
        (), "optimizer", 'Extra scheduler settings as "key=value" strings with Python literal values.',
        used("training", "train/optim.py: the schedule's keyword arguments"), kind="list")
    lr_scheduler_type: str | None = key(
        None, "optimizer",
        "A scheduler class instead of lr_scheduler: a torch.optim.lr_scheduler name (CosineAnnealingLR) or a "
        "class path, built with lr_scheduler_args (no lr_warmup_steps).",
        used("training", "train/optimizers_extra.py: the scheduler class"))
    max_grad_norm: float = key(
        1.0, "optimizer", "Gradient clipping norm (0 = no clipping).",
        used("training", "train/precision.py: gradient clipping"), minimum=0.0)
    # training
    train_batch_size: int = key(
        1, "training", "Images per step.", used("training", "data/batches.py"), minimum=1, maximum=256)
    max_train_steps: int = key(
        1600, "training", "Total optimizer steps (max_train_epochs overrides it).",
        used("training", "data/plan.py: the run's length"), minimum=1, maximum=10_000_000)
    max_train_epochs: int | None = key(
        None, "training", "Train for this many epochs (overrides max_train_steps).",
        used("training", "data/plan.py: the run's length"), minimum=1, maximum=100_000, zero_is_unset=True)
    gradient_accumulation_steps: int = key(
        1, "training", "Batches accumulated per optimizer step.", used("training", "train/loop.py"),
        minimum=1, maximum=1024)
    gradient_checkpointing: bool = key(
        False, "training", "Recompute activations to save memory.",
        used("setup", "train/setup.py: the UNet (and trained text encoders) recompute activations"))
    mixed_precision: str = key(
        "no", "training", "Mixed precision: no, fp16 (CUDA only) or bf16.",
        used("training", "train/precision.py: autocast, fp16 loss scaling"), choices=("no", "fp16", "bf16"))
    seed: int | None = key(
        None, "training", "Random seed (unset = random).", used("training", "train/loop.py: every random draw"),
        minimum=0, maximum=2**32 - 1)
    clip_skip: int | None = key(
        None, "training", "Use the output of the Nth-from-last text encoder layer (SD 1.5; ignored on SDXL as in "
        "kohya).", used("training", "train/conditioning.py"), minimum=1, maximum=12)
    max_token_length: int = key(
        75, "training", "Caption token limit (long captions are encoded in 75-token chunks).",
        used("training", "train/conditioning.py"), choices=(75, 150, 225))
    noise_offset: float | None = key(
        None, "training", "Noise offset strength (about 0.05-0.1; 0 = off).", used("training", "train/noise.py"),
        minimum=0.0, maximum=1.0, zero_is_unset=True)
    min_snr_gamma: float | None = key(
        None, "training", "Min-SNR loss weighting gamma (5 is typical; 0 = off).",
        used("training", "train/noise.py"), minimum=0.0, maximum=100.0, exclusive_minimum=True,
        zero_is_unset=True)
    min_timestep: int | None = key(
        None, "training", "Smallest diffusion timestep trained (0-999).", used("training", "train/noise.py"),
        minimum=0, maximum=999)
    max_timestep: int | None = key(
        None, "training", "Largest diffusion timestep trained, exclusive (1-1000).",
        used("training", "train/noise.py"), minimum=1, maximum=1000)
    # noise and loss variants
    noise_offset_random_strength: bool = key(
        False, "noise", "Draw the noise offset strength uniformly between 0 and noise_offset each step.",
        used("training", "train/noise.py"))
    adaptive_noise_scale: float | None = key(
        None, "noise", "Add this times the absolute latent mean (per channel) to noise_offset (needs noise_offset).",
        used("training", "train/noise.py"), minimum=-1.0, maximum=1.0, zero_is_unset=True)
    multires_noise_iterations: int | None = key(
        None, "noise", "Multires (pyramid) noise levels (6-10 is usual; 0 or unset = off).",
        used("training", "train/noise.py"), minimum=1, maximum=64, zero_is_unset=True)
    multires_noise_discount: float = key(
        0.3, "noise", "Weight decay per multires noise level.", used("training", "train/noise.py"),
        minimum=0.0, maximum=1.0)
    ip_noise_gamma: float | None = key(
        None, "noise", "Input perturbation noise strength (about 0.1; 0 or unset = off).",
        used("training", "train/noise.py"), minimum=0.0, maximum=1.0, zero_is_unset=True)
    ip_noise_gamma_random_strength: bool = key(
        False, "noise", "Draw the input perturbation strength uniformly between 0 and ip_noise_gamma each step.",
        used("training", "train/noise.py"))
    zero_terminal_snr: bool = key(
        False, "noise", "Rescale the noise schedule so the last timestep is pure noise (meant for v-prediction).",
        used("training", "train/noise.py"))
    loss_type: str = key(
        "l2", "noise", "Loss: l2 (MSE), l1, huber or smooth_l1.", used("training", "train/losses.py"),
        choices=LOSS_TYPES)
    huber_schedule: str = key(
        "snr", "noise", "How the Huber threshold follows the timestep (huber and smooth_l1 only).",
        used("training", "train/losses.py"), choices=HUBER_SCHEDULES)
    huber_c: float = key(
        0.1, "noise", "Huber threshold (huber and smooth_l1 only).", used("training", "train/losses.py"),
        minimum=0.0, maximum=10.0, exclusive_minimum=True)
    huber_scale: float = key(
        1.0, "noise", "Huber threshold scale of the exponential and constant schedules.",
        used("training", "train/losses.py"), minimum=0.0, maximum=100.0, exclusive_minimum=True)
    debiased_estimation_loss: bool = key(
        False, "noise", "Weight the loss by 1/sqrt(SNR) (1/(SNR+1) for v-prediction).",
        used("training", "train/losses.py"))
    scale_v_pred_loss_like_noise_pred: bool = key(
        False, "noise",
        "Scale a v-prediction loss by SNR/(SNR+1), like a noise-prediction loss (needs v_parameterization).",
        used("training", "train/losses.py"))
    v_pred_like_loss: float | None = key(
        None, "noise", "Add a v-prediction-like loss term with this weight (not with v_parameterization).",
        used("training", "train/losses.py"), minimum=0.0, maximum=100.0, zero_is_unset=True)
    # saving
    output_dir: str | None = key(
        None, "saving", "Folder for the LoRA files.", used("files", "train/loop.py"), kind="path")
    output_name: str | None = key(
        None, "saving", "File name of the LoRA without extension (kohya writes last.safetensors when unset).",
        used("files", "train/loop.py"))
    save_model_as: str = key(
        "safetensors", "saving", "File format; only safetensors.", fixed("safetensors"),
        choices=("safetensors",))
    save_precision: str = key(
        "float", "saving", "Precision of the saved LoRA: fp16, bf16 or float (kohya's unset = float).",
        used("files", "lora/save.py: the tensors' dtype"), choices=("fp16", "bf16", "float"))
    save_every_n_epochs: int | None = key(
        None, "saving", "Also save a LoRA every N epochs.", used("files", "train/loop.py"),
        minimum=1, zero_is_unset=True)
    save_every_n_steps: int | None = key(
        None, "saving", "Also save a LoRA every N steps.", used("files", "train/loop.py"),
        minimum=1, zero_is_unset=True)
    save_n_epoch_ratio: int | None = key(
        None, "saving", "Save about N files over the run (sets save_every_n_epochs = epochs // N).",
        used("files", "train/loop.py"), minimum=1, maximum=100_000, zero_is_unset=True)
    save_last_n_epochs: int | None = key(
        None, "saving", "Keep only the last N per-epoch files (needs save_every_n_epochs).",
        used("files", "train/loop.py"), minimum=1, maximum=100_000, zero_is_unset=True)
    save_state: bool = key(
        False, "saving", "Also save a resumable training state with each LoRA.",
        used("files", "train/state.py: <output_name>-state/"))
    save_state_on_train_end: bool = key(
        False, "saving", "Save a resumable training state at the end.",
        used("files", "train/state.py: <output_name>-state/"))
    resume: str | None = key(
        None, "saving", "Resume from a saved training state folder.",
        used("training", "train/state.py: weights, optimizer, schedule and RNG restored"), kind="path")
    logging_dir: str | None = key(
        None, "saving",
        "Folder for TensorBoard logs: each run writes <log_prefix><YYYYmmddHHMMSS>/<log_tracker_name>/ with loss, "
        "learning rates and samples, as kohya does.",
        used("files", "train/tensorboard.py"), kind="path")
    log_with: str | None = key(
        None, "saving", 'Logger: "tensorboard" (what logging_dir gives when unset; needs logging_dir).',
        fixed('"tensorboard" (the only logger; wandb is not implemented)'), choices=("tensorboard",))
    log_prefix: str | None = key(
        None, "saving", "Prefix of each run's TensorBoard folder under logging_dir.",
        used("files", "train/tensorboard.py"))
    log_tracker_name: str | None = key(
        None, "saving", "Name of the TensorBoard folder inside each run's folder (kohya's default: network_train).",
        used("files", "train/tensorboard.py"))
    # sampling
    sample_prompts: str | None = key(
        None, "sampling", "File with one sample prompt per line (kohya syntax).", used("files", "train/sample.py"),
        kind="path")
    sample_every_n_epochs: int | None = key(
        None, "sampling", "Generate samples every N epochs (a value past the last epoch, like 999999, never samples).",
        used("files", "train/sample.py"), minimum=1, zero_is_unset=True)
    sample_every_n_steps: int | None = key(
        None, "sampling", "Generate samples every N steps.", used("files", "train/sample.py"),
        minimum=1, zero_is_unset=True)
    sample_sampler: str = key(
        "ddim", "sampling", "Sampler for sample images.", used("samples", "train/sample.py"),
        choices=SAMPLE_SAMPLER_CHOICES)
    # compat
    xformers: bool = key(
        False, "compat", "Accepted for compatibility: this trainer always uses PyTorch scaled-dot-product attention.",
        compat(_SDPA))
    sdpa: bool = key(
        False, "compat", "Accepted for compatibility: PyTorch scaled-dot-product attention is always used.",
        compat(_SDPA))
    mem_eff_attn: bool = key(
        False, "compat", "Accepted for compatibility: PyTorch scaled-dot-product attention is always used.",
        compat(_SDPA))
    lowram: bool = key(
        False, "compat", "Accepted for compatibility: memory is managed by this trainer.", compat(_MEMORY))
    highvram: bool = key(
        False, "compat", "Accepted for compatibility: memory is managed by this trainer.", compat(_MEMORY))
    warnings: tuple[ConfigIssue, ...] = field(default=(), compare=False, repr=False)
    # fmt: on

    # ------------------------------------------------------------------------------------------ derived values
    @property
    def family(self) -> Family:
        """The model family (FM type) trained."""
        return family_for(self.fm_type)

    @property
    def values(self) -> dict[str, Any]:
        """Every key's value by name (for writing the config back; code that trains reads the fields)."""
        return {name: getattr(self, name) for name in SCHEMA}

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (resolution as kohya's "w,h", lists as lists); validation accepts it back."""
        from kohya_backend.config.schema import toml_value

        return {k: toml_value(SCHEMA[k], v) if v is not None else None for k, v in self.values.items()}

    @property
    def effective_unet_lr(self) -> float:
        """The U-Net learning rate in effect (unet_lr, else learning_rate)."""
        return float(self.learning_rate if self.unet_lr is None else self.unet_lr)

    @property
    def effective_text_encoder_lr(self) -> float:
        """The text encoder learning rate in effect (text_encoder_lr, else learning_rate)."""
        return float(self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr)

    @property
    def trains_unet(self) -> bool:
        """Whether the U-Net LoRA is trained."""
        return not self.network_train_text_encoder_only

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder LoRA is trained (not U-Net only, and a learning rate above 0)."""
        return not self.network_train_unet_only and self.effective_text_encoder_lr > 0

    @property
    def network_kwargs(self) -> dict[str, str]:
        """network_args as {key: value string}."""
        return kv_dict(self.network_args)

    @property
    def conv_dim(self) -> int | None:
        """LoCon's rank of 3x3 convolutions (network_args conv_dim), None without LoCon."""
        value = self.network_kwargs.get("conv_dim")
        return int(value) if value is not None else None

    @property
    def conv_alpha(self) -> float | None:
        """LoCon's alpha (network_args conv_alpha), None when unset."""
        value = self.network_kwargs.get("conv_alpha")
        return float(value) if value is not None else None

    @property
    def optimizer_kwargs(self) -> dict[str, Any]:
        """optimizer_args with values read as Python literals, as kohya passes them to the optimizer."""
        return literal_kwargs(self.optimizer_args)

    @property
    def lr_scheduler_kwargs(self) -> dict[str, Any]:
        """lr_scheduler_args with values read as Python literals, as kohya passes them to the scheduler."""
        return literal_kwargs(self.lr_scheduler_args)

    @property
    def captions_vary(self) -> bool:
        """Whether an image's caption can differ between the times it is drawn (shuffle or dropout)."""
        return any(getattr(self, k) for k in CAPTION_VARIATION_KEYS)

    @property
    def prediction_type(self) -> str:
        """What the UNet is trained to predict: "v_prediction" with v_parameterization, else "epsilon"."""
        return "v_prediction" if self.v_parameterization else "epsilon"

    @property
    def effective_clip_skip(self) -> int:
        """The text encoder layer (from the end) conditioning comes from; 1 where the family ignores clip_skip."""
        return int(self.clip_skip or 1) if self.family.uses_clip_skip else 1

    @property
    def sampling_enabled(self) -> bool:
        """Whether samples are made: prompts given and a schedule set."""
        return bool(self.sample_prompts) and bool(self.sample_every_n_epochs or self.sample_every_n_steps)

    @property
    def output_stem(self) -> str:
        """The LoRA's file name without extension: output_name, or kohya's "last"."""
        return output_stem(self.output_name)

    @property
    def state_dir(self) -> Path:
        """Where save_state writes resumable states: <output_dir>/<output_stem>-state."""
        return state_dir_for(Path(self.output_dir or "."), self.output_stem)

    def lr_warmup_steps_for(self, total_steps: int) -> int:
        """Warmup steps for a run of total_steps (a value below 1 is a fraction of the run, as in kohya)."""
        value = self.lr_warmup_steps
        return int(value * total_steps) if isinstance(value, float) else int(value)

    def save_every_n_epochs_for(self, num_epochs: int) -> int | None:
        """Epoch interval for intermediate saves: save_n_epoch_ratio wins over save_every_n_epochs, as in kohya."""
        if self.save_n_epoch_ratio:
            return max(1, num_epochs // self.save_n_epoch_ratio)
        return self.save_every_n_epochs


SCHEMA: dict[str, KeySpec] = specs_of(TrainConfig)
KEY_NAMES: tuple[str, ...] = tuple(SCHEMA)
