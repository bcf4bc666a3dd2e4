"""Everything a run prepares before its first step, built in order and handed to the loop as one typed Setup:
the dataset and its plan, the model and its LoRA, the input caches, the optimizer and schedules.

Work that does not change between steps happens here once: latents and (frozen) text conditioning are cached,
each fixed caption is tokenised once.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from kohya_backend.config.train_config import CAPTION_VARIATION_KEYS, TrainConfig
from kohya_backend.data.batches import TrainItem
from kohya_backend.data.captions import build_caption
from kohya_backend.data.dataset_config import SubsetOptions, options_from_config
from kohya_backend.data.plan import TrainingPlan
from kohya_backend.data.scan import DatasetScan
from kohya_backend.lora.build import TrainedNetwork, create_network
from kohya_backend.lora.save import load_lora
from kohya_backend.models.diffusers_folder import resolve_model_path
from kohya_backend.models.frozen import route_frozen_layers
from kohya_backend.models.hashing import BackgroundSha256
from kohya_backend.models.load import LoadedModel, load_checkpoint
from kohya_backend.models.upcast import upcast_mode
from kohya_backend.models.weight_plan import WeightPlan, describe_weights, plan_weights
from kohya_backend.train.conditioning import Conditioning, ModelFamily, get_family
from kohya_backend.train.device import optimizer_for_platform
from kohya_backend.train.distributed import Processes
from kohya_backend.train.events import EventLog
from kohya_backend.train.inputs import TEXT_CACHE_DIR, LatentCache, TextCache
from kohya_backend.train.losses import LossSettings
from kohya_backend.train.noise import make_noise_scheduler
from kohya_backend.train.optim import (
    build_optimizer,
    check_optimizer_settings,
    optimizer_description,
    steps_per_optimizer_step,
)
from kohya_backend.train.plan import plan_for, scan_for
from kohya_backend.train.precision import Precision
from kohya_backend.train.runtime import release_pages

TEXT_CACHE_BATCH = 16  # captions per text-encoder call when caching them all before training


@functools.lru_cache(maxsize=8)
def _config_options(config: TrainConfig) -> SubsetOptions:
    return options_from_config(config.values)


def options_for(config: TrainConfig, scan: DatasetScan, item: TrainItem) -> SubsetOptions:
    """The caption and augmentation settings an item trains with: its dataset_config subset's, else the config's."""
    return scan.subsets[item.subset_index].options or _config_options(config)


def captions_vary(config: TrainConfig, scan: DatasetScan) -> bool:
    """Whether an image's caption can differ between draws (shuffle or dropout, in the config or in a subset)."""
    variation = [f.name for f in fields(SubsetOptions) if f.name in CAPTION_VARIATION_KEYS]
    subsets = [s.options for s in scan.subsets if s.options is not None]
    return config.captions_vary or any(getattr(o, key) for o in subsets for key in variation)


def caption_for(
    config: TrainConfig, scan: DatasetScan, item: TrainItem, *, epoch: int, rng: random.Random
) -> str:
    """The caption an item is trained with on one draw (prefix/suffix, shuffle, dropout as its settings say)."""
    options = options_for(config, scan, item)
    return build_caption(
        item.image.caption,
        scan.subsets[item.subset_index].class_token,
        epoch=epoch,
        rng=rng,
        shuffle=options.shuffle_caption,
        keep_tokens=options.keep_tokens,
        keep_tokens_separator=options.keep_tokens_separator or "",
        dropout_rate=options.caption_dropout_rate,
        dropout_every_n_epochs=options.caption_dropout_every_n_epochs,
        tag_dropout_rate=options.caption_tag_dropout_rate,
        prefix=options.caption_prefix or "",
        suffix=options.caption_suffix or "",
    )


def auto_vae_batch_size(resolution: tuple[int, int], device: torch.device | str) -> int:
    """Latent-caching batch when vae_batch_size is unset.

    On a GPU, 4 images at 512x512, scaled by area, within 1..8. On the CPU one image at a time: its activations
    stay in the caches, so a batch of 8 at 256 px takes 8.1 s where 8 single images take 6.5 s.
    """
    if torch.device(device).type == "cpu":
        return 1
    w, h = resolution
    return max(1, min(8, (4 * 512 * 512) // (w * h)))


class TextConditioner:
    """Captions to text conditioning, as the run needs it: through the trained encoders with gradients, else
    without, from the text cache when there is one; a caption that cannot change is tokenised once per run."""

    def __init__(
        self,
        config: TrainConfig,
        model: LoadedModel,
        precision: Precision,
        *,
        trained: bool,
        cache: TextCache | None,
        vary: bool,
    ) -> None:
        self.family: ModelFamily = get_family(config.fm_type)
        self.model = model
        self.precision = precision
        self.trained = trained
        self.cache = cache
        self.max_token_length = config.max_token_length
        self.clip_skip = config.effective_clip_skip
        self.memoise_ids = not vary
        self.ids: dict[str, list[torch.Tensor]] = {}  # token ids per caption, per tokenizer

    def token_ids(self, captions: list[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer for a batch of captions."""
        tokenizers = self.model.tokenizers
        if not self.memoise_ids:
            return self.family.token_ids(tokenizers, captions, self.max_token_length)
        new = [c for c in dict.fromkeys(captions) if c not in self.ids]
        if new:
            per_tokenizer = self.family.token_ids(tokenizers, new, self.max_token_length)
            for i, caption in enumerate(new):
                self.ids[caption] = [ids[i] for ids in per_tokenizer]
        return [torch.stack([self.ids[c][t] for c in captions]) for t in range(len(tokenizers))]

    def _encode(self, captions: list[str]) -> Conditioning:
        return self.family.encode(self.model.text_encoders, self.token_ids(captions), self.clip_skip)

    def __call__(self, captions: list[str]) -> Conditioning:
        if self.trained:
            return self._encode(captions)
        with torch.no_grad(), self.precision.autocast():
            if self.cache is None:
                return self._encode(captions)
            return self.cache.conditioning(captions, self._encode).to(self.precision.device)


@dataclass
class Setup:
    """What the loop trains with; built once by `prepare`."""

    scan: DatasetScan
    plan: TrainingPlan
    model: LoadedModel
    network: TrainedNetwork
    latent_cache: LatentCache | None
    text: TextConditioner
    optimizer: torch.optim.Optimizer
    optimizer_type: (
        str  # what was built: optimizer_type, or its 32-bit stand-in where bitsandbytes has no build
    )
    optimizer_name: str  # kohya's description, for ss_optimizer
    lr_scheduler: LRScheduler
    lr_steps_per_step: int  # scheduler steps per optimizer step (optim.steps_per_optimizer_step)
    noise_scheduler: Any
    loss_settings: LossSettings
    base_model: Path  # the file or folder pretrained_model_name_or_path names (a hub id's cached snapshot)
    # None for a folder (a diffusers model has no one file to hash), and in the processes that do not save
    # (data-parallel ranks above 0)
    base_sha256: BackgroundSha256 | None
    weight_plan: WeightPlan  # how the frozen weights are stored (models/weight_plan.py)
    # TRAIN_MANAGEMENT_FROZEN_WEIGHTS: whether kept fp16 weights are upcast after the first step (models/upcast.py)
    frozen_weights_mode: str

    @property
    def items(self) -> list[TrainItem]:
        """Every image (with its bucket) an epoch draws from."""
        return self.plan.items


def _load_model(
    config: TrainConfig, model_path: Path, precision: Precision, events: EventLog
) -> tuple[LoadedModel, WeightPlan]:
    """The frozen base model, stored as models/weight_plan decides for this device and precision: a CPU run keeps
    an fp16 file's frozen weights in fp16 (same results, half the memory), a CPU bf16 run stores them in bf16."""
    weight_dtype = precision.weight_dtype
    vae_dtype = torch.float32 if config.no_half_vae or weight_dtype == torch.float32 else weight_dtype
    events.emit("log", message=f"loading {config.pretrained_model_name_or_path}")
    plan = plan_weights(precision.device, precision.autocast_dtype)
    for warning in plan.warnings:
        events.emit("warning", message=warning)
    model = load_checkpoint(
        model_path,
        config.fm_type,
        dtype=weight_dtype,
        vae_dtype=vae_dtype,
        device=str(precision.device),
        tokenizer_dir=Path(config.tokenizer_cache_dir) if config.tokenizer_cache_dir else None,
        keep_file_precision=plan.keep_file_precision,
        compute_dtype=plan.compute_dtype,
    )
    frozen = [model.unet, model.vae, *model.text_encoders]
    events.emit("log", message=describe_weights(frozen, plan, precision.device))
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
        if precision.device.type == "cpu":
            # before the LoRA wraps them: no saved inputs, no per-call weight copies (models/frozen.py)
            route_frozen_layers(module)
    return model, plan


def _build_network(config: TrainConfig, model: LoadedModel, precision: Precision) -> TrainedNetwork:
    network = create_network(
        config.network_module,
        family=config.fm_type,
        unet=model.unet,
        text_encoders=model.text_encoders,
        network_dim=config.network_dim,
        network_alpha=config.network_alpha,
        network_args=config.network_kwargs,
        dropout=config.network_dropout,
        train_unet=config.trains_unet,
        train_text_encoder=config.trains_text_encoder,
        unet_layers_per_block=model.arch.layers_per_block,
    )
    network.apply_to()
    if config.network_weights:
        state, _ = load_lora(Path(config.network_weights))
        network.load_kohya_state_dict(state)
    network.to(precision.device)
    if config.gradient_checkpointing:
        unet: Any = model.unet
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers only checkpoints in train mode; SD UNets have no dropout
        if config.trains_text_encoder:
            for te in model.text_encoders:
                te_any: Any = te
                te_any.gradient_checkpointing_enable()
                te_any.train()
    return network


def _latent_cache(
    config: TrainConfig,
    model: LoadedModel,
    scan: DatasetScan,
    items: list[TrainItem],
    precision: Precision,
    events: EventLog,
    seed: int,
    processes: Processes,
) -> LatentCache | None:
    if not config.cache_latents:
        return None
    fingerprint = f"{model.path.resolve()}|{model.vae.dtype}"
    cache = LatentCache(to_disk=config.cache_latents_to_disk, model_fingerprint=fingerprint)
    flip_aug = any(options_for(config, scan, it).flip_aug for it in items)
    events.emit("caching", what="latents", done=0, total=len(items))
    # Every process caches every image (any of them may draw it); on disk rank 0 writes first, the others read.
    with processes.main_first(enabled=config.cache_latents_to_disk):
        cache.fill(
            items,
            model.vae,
            scale=model.arch.latent_scale,
            flips=(False, True) if flip_aug else (False,),
            batch_size=config.vae_batch_size or auto_vae_batch_size(config.resolution, precision.device),
            generator=torch.Generator().manual_seed(seed),
            progress=lambda d, t: events.emit("caching", what="latents", done=d, total=t),
        )
    if not config.sampling_enabled:
        release_pages(model.vae)  # nothing needs the VAE any more: give its memory back
        model.vae.to("meta")
    return cache


def _text_cache(config: TrainConfig, model: LoadedModel, *, vary: bool) -> TextCache | None:
    """Memoised conditioning while the text encoders are frozen: every caption with cache_text_encoder_outputs
    (on disk too with cache_text_encoder_outputs_to_disk), else a bounded memo, and none when captions change
    each time they are drawn (`vary`: each shuffle is a new caption that would never be looked up again)."""
    if config.trains_text_encoder:
        return None
    if not config.cache_text_encoder_outputs:
        return None if vary else TextCache()
    disk_dir = None
    if config.cache_text_encoder_outputs_to_disk:
        # beside the dataset: train_data_dir, or the folder of the dataset_config that names the images
        data = (
            Path(config.dataset_config).parent if config.dataset_config else Path(str(config.train_data_dir))
        )
        disk_dir = data / TEXT_CACHE_DIR
    fingerprint = "|".join(
        [
            str(model.path.resolve()),
            config.fm_type,
            str(model.text_encoders[0].dtype),
            f"clip_skip={config.effective_clip_skip}",
            f"max_token_length={config.max_token_length}",
        ]
    )
    return TextCache(max_bytes=None, disk_dir=disk_dir, fingerprint=fingerprint)


def _cache_all_captions(
    config: TrainConfig,
    scan: DatasetScan,
    items: list[TrainItem],
    text: TextConditioner,
    events: EventLog,
) -> None:
    """cache_text_encoder_outputs: encode every caption before training, then let the encoders go."""
    cache = text.cache
    if cache is None or not config.cache_text_encoder_outputs:
        return
    captions = sorted({caption_for(config, scan, it, epoch=1, rng=random.Random(0)) for it in items})
    for start in range(0, len(captions), TEXT_CACHE_BATCH):
        text(captions[start : start + TEXT_CACHE_BATCH])
    events.emit(
        "caching", what="text", done=len(captions), total=len(captions), from_disk=cache.loaded_from_disk
    )
    if not config.sampling_enabled:
        for te in text.model.text_encoders:
            te.to("meta")


def prepare(
    config: TrainConfig,
    precision: Precision,
    events: EventLog,
    *,
    seed: int,
    processes: Processes | None = None,
) -> Setup:
    """Scan and plan the dataset, load the model, build the LoRA, fill the caches, build the optimizer
    (`processes`: the data-parallel run this process is part of; the plan counts its steps)."""
    processes = processes or Processes.single(precision.device)
    scan = scan_for(config)
    for warning in scan.warnings:
        events.emit("warning", message=warning)
    plan = plan_for(config, scan, num_processes=processes.world_size)
    check_optimizer_settings(
        config, total_steps=plan.total_steps
    )  # a bad optimizer_args fails before loading
    events.total_steps = plan.total_steps
    events.emit("plan", **plan.to_dict())
    # kohya's metadata needs the base model's sha256: hash it (or take it from the cache) while we load and train
    base_model = resolve_model_path(str(config.pretrained_model_name_or_path))
    base_sha256 = BackgroundSha256(base_model) if base_model.is_file() and processes.is_main else None
    frozen_weights_mode = upcast_mode()  # a bad TRAIN_MANAGEMENT_FROZEN_WEIGHTS fails before loading
    model, weight_plan = _load_model(config, base_model, precision, events)
    network = _build_network(config, model, precision)
    latent_cache = _latent_cache(config, model, scan, plan.items, precision, events, seed, processes)
    vary = captions_vary(config, scan)
    text = TextConditioner(
        config,
        model,
        precision,
        trained=config.trains_text_encoder,
        cache=_text_cache(config, model, vary=vary),
        vary=vary,
    )
    with processes.main_first(enabled=config.cache_text_encoder_outputs_to_disk):
        _cache_all_captions(config, scan, plan.items, text, events)
    groups = network.param_groups(
        unet_lr=config.effective_unet_lr, text_encoder_lr=config.effective_text_encoder_lr
    )
    optimizer_type, substituted = optimizer_for_platform(config.optimizer_type)
    if substituted:
        events.emit("warning", message=substituted)
    optimizer, lr_scheduler = build_optimizer(
        config,
        groups,
        total_steps=plan.total_steps,
        optimizer_type=optimizer_type,
        num_processes=processes.world_size,
    )
    lr_steps = steps_per_optimizer_step(lr_scheduler, processes.world_size)
    noise_scheduler: Any = make_noise_scheduler(
        config.prediction_type, zero_terminal_snr=config.zero_terminal_snr
    )
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(precision.device)
    noise_scheduler.all_snr = noise_scheduler.all_snr.to(precision.device)
    return Setup(
        scan=scan,
        plan=plan,
        model=model,
        network=network,
        latent_cache=latent_cache,
        text=text,
        optimizer=optimizer,
        optimizer_type=optimizer_type,
        optimizer_name=optimizer_description(optimizer, config.optimizer_kwargs),
        lr_scheduler=lr_scheduler,
        lr_steps_per_step=lr_steps,
        noise_scheduler=noise_scheduler,
        loss_settings=LossSettings(
            loss_type=config.loss_type,
            huber_schedule=config.huber_schedule,
            huber_c=config.huber_c,
            huber_scale=config.huber_scale,
            scale_v_pred_loss_like_noise_pred=config.scale_v_pred_loss_like_noise_pred,
            v_pred_like_loss=config.v_pred_like_loss,
            debiased_estimation_loss=config.debiased_estimation_loss,
        ),
        base_model=base_model,
        base_sha256=base_sha256,
        weight_plan=weight_plan,
        frozen_weights_mode=frozen_weights_mode,
    )
