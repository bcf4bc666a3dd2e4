"""The training loop, readable top to bottom: prepare -> (schedule -> forward -> loss -> backward -> step ->
save/sample/stop checks) per batch -> final save.

Work that does not change between steps (latents, frozen text conditioning, tokenisation) is done once before the
loop; the loop polls `stop` so a cancel can save state and leave cleanly.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from kohya_backend.config.format import to_canonical_toml
from kohya_backend.config.optimizers import is_schedule_free
from kohya_backend.config.validate import TrainConfig
from kohya_backend.data.batches import TrainItem, build_items, epoch_batches
from kohya_backend.data.buckets import BucketAssigner
from kohya_backend.data.captions import build_caption
from kohya_backend.data.plan import TrainingPlan
from kohya_backend.data.scan import DatasetScan, scan_dataset
from kohya_backend.errors import TrainingError
from kohya_backend.lora.build import create_network
from kohya_backend.lora.metadata import training_metadata
from kohya_backend.lora.save import load_lora, save_lora
from kohya_backend.models.checkpoint import SAFETENSORS_SUFFIXES
from kohya_backend.models.frozen import route_frozen_layers
from kohya_backend.models.hashing import BackgroundSha256, legacy_hash_file
from kohya_backend.models.load import LoadedModel, load_checkpoint
from kohya_backend.models.upcast import choose_upcast, kept_weights, memory_facts, upcast_mode, upcast_weights
from kohya_backend.models.weight_plan import describe_weights, plan_weights
from kohya_backend.train.device import detect_facts, device_label, optimizer_for_platform, plan_device
from kohya_backend.train.epoch_grid import render_after_training
from kohya_backend.train.events import EventLog
from kohya_backend.train.families import Conditioning, ModelFamily, get_family, sdxl_time_ids
from kohya_backend.train.inputs import LatentCache, TextCache, encode_latents, prepare_image
from kohya_backend.train.losses import LossSettings
from kohya_backend.train.noise import (
    diffusion_loss,
    input_perturbation,
    make_noise_scheduler,
    sample_noise,
    sample_timesteps,
    training_target,
)
from kohya_backend.train.optim import create_lr_scheduler, create_optimizer, current_lrs
from kohya_backend.train.optimizers_extra import (
    ConstantForScheduleFree,
    create_class_scheduler,
    set_optimizer_mode,
)
from kohya_backend.train.plan import plan_for
from kohya_backend.train.runtime import release_pages, tune_allocator
from kohya_backend.train.sample import generate_samples, parse_sample_prompts
from kohya_backend.train.state import PROGRESS_FILE, latest_state, load_training_state, save_training_state

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    output: Path | None
    step: int
    epoch: int
    saved: list[Path] = field(default_factory=list)
    last_loss: float | None = None
    stopped: bool = False
    losses: list[float] = field(default_factory=list)


@dataclass
class _Batch:
    latents: torch.Tensor
    captions: list[str]
    time_ids: torch.Tensor | None
    weights: torch.Tensor


def auto_vae_batch_size(resolution: tuple[int, int], device: torch.device | str) -> int:
    """Latent-caching batch when vae_batch_size is unset.

    On a GPU, 4 images at 512x512, scaled by area, within 1..8. On the CPU one image at a time: its activations
    stay in the caches, so a batch of 8 at 256 px takes 8.1 s where 8 single images take 6.5 s.
    """
    if torch.device(device).type == "cpu":
        return 1
    w, h = resolution
    return max(1, min(8, (4 * 512 * 512) // (w * h)))


class Trainer:
    """One training run of a validated config; `run()` does everything and returns what it saved."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        events: EventLog,
        stop: threading.Event | None = None,
        state_each_epoch: bool = False,
    ) -> None:
        self.config = config
        # A job (train --job) saves its state (with save_state) after every epoch, not only with saved epochs.
        self.state_each_epoch = state_each_epoch
        self.cfg = config.values
        self.events = events
        self.stop = stop or threading.Event()
        self.family: ModelFamily = get_family(config.fm_type)
        seed = self.cfg.get("seed")
        self.seed = int(seed) if seed is not None else random.SystemRandom().randrange(2**31)
        self.output_dir = Path(self.cfg["output_dir"])
        self.output_name = str(self.cfg.get("output_name") or "last")
        self.state_dir = self.output_dir / f"{self.output_name}-state"
        self.prediction_type = "v_prediction" if self.cfg.get("v_parameterization") else "epsilon"
        self.session_id = uuid.uuid4().hex
        self.started_at = time.time()
        self.step = 0
        self.epoch = 0
        self.batches_done = 0
        self.saved: list[Path] = []
        self.losses: list[float] = []
        self.max_norm_log: dict[str, float] | None = None  # kohya's max-norm numbers of the last step
        self._ids: dict[str, list[torch.Tensor]] = {}  # token ids per caption, per tokenizer

    # ----------------------------------------------------------------------------------------------- prepare
    def _prepare_data(self) -> None:
        cfg = self.cfg
        reg = cfg.get("reg_data_dir")
        self.scan: DatasetScan = scan_dataset(
            Path(cfg["train_data_dir"]), cfg["caption_extension"], reg_data_dir=Path(reg) if reg else None
        )
        for warning in self.scan.warnings:
            self.events.emit("warning", message=warning)
        self.assigner = BucketAssigner(
            self.config.resolution,
            enable_bucket=bool(cfg["enable_bucket"]),
            min_size=int(cfg["min_bucket_reso"]),
            max_size=int(cfg["max_bucket_reso"]),
            reso_steps=int(cfg["bucket_reso_steps"]),
            no_upscale=bool(cfg["bucket_no_upscale"]),
        )
        self.items: list[TrainItem] = build_items(self.scan, self.assigner)
        self.plan: TrainingPlan = plan_for(self.config, self.scan)
        self.events.total_steps = self.plan.total_steps
        self.events.emit("plan", **self.plan.to_dict())

    def _prepare_model(self, accelerator: Accelerator) -> None:
        cfg = self.cfg
        weight_dtype = DTYPES[self.device_plan.weight_dtype]
        vae_dtype = torch.float32 if cfg.get("no_half_vae") or weight_dtype == torch.float32 else weight_dtype
        self.weight_dtype = weight_dtype
        self.events.emit("log", message=f"loading {cfg['pretrained_model_name_or_path']}")
        tok_dir = cfg.get("tokenizer_cache_dir")
        # CPU runs keep an fp16 file's frozen weights in fp16 (same results, half the memory), bf16 ones store them
        # in bf16 (models/weight_plan.py)
        cpu_bf16 = self.device_plan.kind == "cpu" and self.device_plan.mixed_precision == "bf16"
        plan = plan_weights(accelerator.device, torch.bfloat16 if cpu_bf16 else None)
        for warning in plan.warnings:
            self.events.emit("warning", message=warning)
        # weights kept in fp16 may be upcast once the first step has shown the run's peak (models/upcast.py)
        self._upcast_mode = upcast_mode()
        self._upcast_pending = plan.keep_file_precision and plan.compute_dtype is None
        self.model: LoadedModel = load_checkpoint(
            Path(cfg["pretrained_model_name_or_path"]),
            self.config.fm_type,
            dtype=weight_dtype,
            vae_dtype=vae_dtype,
            device=str(accelerator.device),
            tokenizer_dir=Path(tok_dir) if tok_dir else None,
            keep_file_precision=plan.keep_file_precision,
            compute_dtype=plan.compute_dtype,
        )
        m = self.model
        frozen = [m.unet, m.vae, *m.text_encoders]
        self.events.emit("log", message=describe_weights(frozen, plan, accelerator.device))
        for module in [m.unet, m.vae, *m.text_encoders]:
            module.requires_grad_(False)
            module.eval()
            if accelerator.device.type == "cpu":
                # before the LoRA wraps them: no saved inputs, no per-call weight copies (models/frozen.py)
                route_frozen_layers(module)
        self.train_unet = not cfg.get("network_train_text_encoder_only")
        self.train_te = not cfg.get("network_train_unet_only") and float(self.config.text_encoder_lr or 0) > 0
        self.network = create_network(
            str(cfg.get("network_module") or "networks.lora"),
            family=self.config.fm_type,
            unet=m.unet,
            text_encoders=m.text_encoders,
            network_dim=int(cfg["network_dim"]),
            network_alpha=float(cfg["network_alpha"]),
            network_args=self.config.network_args,
            dropout=cfg.get("network_dropout"),
            train_unet=self.train_unet,
            train_text_encoder=self.train_te,
            unet_layers_per_block=int(m.arch.unet.get("layers_per_block", 2)),
        )
        self.network.apply_to()
        if cfg.get("network_weights"):
            sd, _ = load_lora(Path(cfg["network_weights"]))
            self.network.load_kohya_state_dict(sd)
        self.network.to(accelerator.device)
        if cfg.get("gradient_checkpointing"):
            unet: Any = m.unet
            unet.enable_gradient_checkpointing()
            unet.train()  # diffusers only checkpoints in train mode; SD UNets have no dropout
            if self.train_te:
                for te in m.text_encoders:
                    te_any: Any = te
                    te_any.gradient_checkpointing_enable()
                    te_any.train()

    def _prepare_caches(self, accelerator: Accelerator) -> None:
        cfg = self.cfg
        m = self.model
        self.latent_cache: LatentCache | None = None
        if cfg.get("cache_latents"):
            fingerprint = f"{Path(cfg['pretrained_model_name_or_path']).resolve()}|{m.vae.dtype}"
            self.latent_cache = LatentCache(
                to_disk=bool(cfg.get("cache_latents_to_disk")), model_fingerprint=fingerprint
            )
            flips = (False, True) if cfg.get("flip_aug") else (False,)
            gen = torch.Generator().manual_seed(self.seed)
            self.events.emit("caching", what="latents", done=0, total=len(self.items))
            self.latent_cache.fill(
                self.items,
                m.vae,
                scale=m.arch.latent_scale,
                flips=flips,
                batch_size=int(
                    cfg.get("vae_batch_size")
                    or auto_vae_batch_size(self.config.resolution, accelerator.device)
                ),
                generator=gen,
                progress=lambda d, t: self.events.emit("caching", what="latents", done=d, total=t),
            )
            if not self._sampling_enabled():
                release_pages(m.vae)  # nothing needs the VAE any more: give its memory back
                m.vae.to("meta")
        self.text_cache: TextCache | None = None if self.train_te else TextCache()
        if self.text_cache is not None and cfg.get("cache_text_encoder_outputs"):
            captions = sorted({self._caption_for(it, epoch=1, rng=random.Random(0)) for it in self.items})
            for start in range(0, len(captions), 16):
                self._conditioning(captions[start : start + 16], accelerator)
            self.events.emit("caching", what="text", done=len(captions), total=len(captions))
            if not self._sampling_enabled():
                for te in m.text_encoders:
                    te.to("meta")

    def _prepare_optimizer(self, accelerator: Accelerator) -> None:
        cfg = self.cfg
        groups = self.network.param_groups(
            unet_lr=float(self.config.unet_lr or 0), text_encoder_lr=float(self.config.text_encoder_lr or 0)
        )
        optimizer_type, skipped = optimizer_for_platform(cfg["optimizer_type"])
        if skipped:
            self.events.emit("warning", message=skipped)
        self.optimizer_type = optimizer_type
        self.optimizer = create_optimizer(
            self.optimizer_type,
            groups,
            lr=float(cfg["learning_rate"]),
            optimizer_args=self.config.optimizer_args,
        )
        total = self.plan.total_steps
        warmup = self.config.lr_warmup_steps_for(total)
        scheduler_args = self.config.lr_scheduler_kwargs()
        if is_schedule_free(self.optimizer_type):
            self.lr_scheduler: Any = ConstantForScheduleFree(
                self.optimizer
            )  # they schedule themselves, as kohya
        elif cfg.get("lr_scheduler_type"):
            self.lr_scheduler = create_class_scheduler(
                str(cfg["lr_scheduler_type"]), self.optimizer, scheduler_args, warmup_steps=warmup
            )
        else:
            self.lr_scheduler = create_lr_scheduler(
                cfg["lr_scheduler"],
                self.optimizer,
                warmup_steps=warmup,
                total_steps=total,
                num_cycles=int(cfg.get("lr_scheduler_num_cycles") or 1),
                power=float(cfg.get("lr_scheduler_power") or 1.0),
                scheduler_args=scheduler_args,
            )
        scheduler: Any = make_noise_scheduler(
            self.prediction_type, zero_terminal_snr=bool(cfg.get("zero_terminal_snr"))
        )
        self.noise_scheduler = scheduler
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(accelerator.device)
        scheduler.all_snr = scheduler.all_snr.to(accelerator.device)
        self.loss_settings = LossSettings(
            loss_type=str(cfg.get("loss_type") or "l2"),
            huber_schedule=str(cfg.get("huber_schedule") or "snr"),
            huber_c=float(cfg.get("huber_c") or 0.1),
            huber_scale=float(cfg.get("huber_scale") or 1.0),
            scale_v_pred_loss_like_noise_pred=bool(cfg.get("scale_v_pred_loss_like_noise_pred")),
            v_pred_like_loss=cfg.get("v_pred_like_loss"),
            debiased_estimation_loss=bool(cfg.get("debiased_estimation_loss")),
        )

    def _resume_path(self) -> Path | None:
        """The state folder `resume` names (a state-* folder, or a folder of them: the newest), or None."""
        resume = self.cfg.get("resume")
        if not resume:
            return None
        path = Path(resume)
        if path.is_dir() and not (path / PROGRESS_FILE).exists():
            found = latest_state(path)
            if found is None:
                raise TrainingError(
                    f"no saved state found in {path}", hint="point `resume` at a state-* folder"
                )
            path = found
        if not (path / PROGRESS_FILE).exists():
            raise TrainingError(
                f"{path} is not a saved training state", hint="point `resume` at a state-* folder"
            )
        return path

    def _resume_seed(self) -> None:
        """Before anything random happens, take the seed of the run being resumed (it may have been drawn)."""
        path = self._resume_path()
        if path is not None:
            extra = json.loads((path / PROGRESS_FILE).read_text(encoding="utf-8")).get("extra") or {}
            self.seed = int(extra.get("seed", self.seed))

    def _maybe_resume(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        progress = load_training_state(
            path, network=self.network, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler
        )
        self.step, self.epoch, self.batches_done = (
            progress.step,
            progress.epoch,
            progress.batches_done_in_epoch,
        )
        set_optimizer_mode(self.optimizer, self.optimizer_type, train=True)  # a state is saved in eval mode
        self.events.emit("log", message=f"resumed from {path} at step {self.step}, epoch {self.epoch}")

    # ----------------------------------------------------------------------------------------------- inputs
    def _sampling_enabled(self) -> bool:
        return bool(self.cfg.get("sample_prompts")) and bool(
            self.cfg.get("sample_every_n_epochs") or self.cfg.get("sample_every_n_steps")
        )

    def _caption_for(self, item: TrainItem, *, epoch: int, rng: random.Random) -> str:
        cfg = self.cfg
        subset = self.scan.subsets[item.subset_index]
        return build_caption(
            item.image.caption,
            subset.class_token,
            epoch=epoch,
            rng=rng,
            shuffle=bool(cfg.get("shuffle_caption")),
            keep_tokens=int(cfg.get("keep_tokens") or 0),
            keep_tokens_separator=str(cfg.get("keep_tokens_separator") or ""),
            dropout_rate=float(cfg.get("caption_dropout_rate") or 0),
            dropout_every_n_epochs=int(cfg.get("caption_dropout_every_n_epochs") or 0),
            tag_dropout_rate=float(cfg.get("caption_tag_dropout_rate") or 0),
            prefix=str(cfg.get("caption_prefix") or ""),
            suffix=str(cfg.get("caption_suffix") or ""),
        )

    def _token_ids(self, captions: list[str], max_len: int) -> list[torch.Tensor]:
        """Token ids per tokenizer for a batch; each caption is tokenised once per run, not once per step."""
        new = [c for c in dict.fromkeys(captions) if c not in self._ids]
        if new:
            per_tokenizer = self.family.token_ids(self.model.tokenizers, new, max_len)
            for i, caption in enumerate(new):
                self._ids[caption] = [ids[i] for ids in per_tokenizer]
        return [torch.stack([self._ids[c][t] for c in captions]) for t in range(len(self.model.tokenizers))]

    def _conditioning(self, captions: list[str], accelerator: Accelerator) -> Conditioning:
        m = self.model
        max_len = int(self.cfg.get("max_token_length") or 75)
        clip_skip = int(self.cfg.get("clip_skip") or 1)
        if self.text_cache is None:
            return self.family.encode(m.text_encoders, self._token_ids(captions, max_len), clip_skip)
        missing = self.text_cache.lookup(captions)
        if missing:
            ids = self._token_ids(missing, max_len)
            with torch.no_grad(), accelerator.autocast():
                self.text_cache.add(missing, self.family.encode(m.text_encoders, ids, clip_skip))
        return self.text_cache.batch(captions).to(accelerator.device)

    def _make_batch(self, batch: list[TrainItem], rng: random.Random, step_gen: torch.Generator) -> _Batch:
        cfg = self.cfg
        flip_aug = bool(cfg.get("flip_aug"))
        flips = [flip_aug and rng.random() < 0.5 for _ in batch]
        captions = [self._caption_for(it, epoch=self.epoch, rng=rng) for it in batch]
        geos = []
        if self.latent_cache is not None:
            pairs = [self.latent_cache.get(it, f) for it, f in zip(batch, flips)]
            latents = torch.stack([p[0] for p in pairs])
            geos = [p[1] for p in pairs]
        else:
            random_crop = bool(cfg.get("random_crop"))
            prepared = [
                prepare_image(it, flip=f, random_crop=random_crop, rng=rng) for it, f in zip(batch, flips)
            ]
            with torch.no_grad():
                latents = encode_latents(
                    self.model.vae,
                    torch.stack([p.pixels for p in prepared]),
                    scale=self.model.arch.latent_scale,
                    generator=step_gen,
                )
            geos = prepared
        time_ids = None
        if self.config.fm_type == "sd_xl":
            time_ids = sdxl_time_ids(
                [g.original_size for g in geos], [g.crop for g in geos], [g.target_size for g in geos]
            )
        prior_cfg = cfg.get("prior_loss_weight")
        prior = 1.0 if prior_cfg is None else float(prior_cfg)
        weights = torch.tensor([prior if it.is_reg else 1.0 for it in batch])
        return _Batch(latents, captions, time_ids, weights)

    # ----------------------------------------------------------------------------------------------- step
    def _train_step(self, batch: _Batch, accelerator: Accelerator, step_gen: torch.Generator) -> float:
        cfg = self.cfg
        device = accelerator.device
        latents = batch.latents.to(device, torch.float32)
        # drawn from the CPU generator (same numbers on any device) and placed on the device, no host copy of latents
        discount = cfg.get("multires_noise_discount")
        noise = sample_noise(
            latents,
            generator=step_gen,
            noise_offset=cfg.get("noise_offset"),
            noise_offset_random_strength=bool(cfg.get("noise_offset_random_strength")),
            adaptive_noise_scale=cfg.get("adaptive_noise_scale"),
            multires_iterations=cfg.get("multires_noise_iterations"),
            multires_discount=0.3 if discount is None else float(discount),
        )
        timesteps = sample_timesteps(
            latents.shape[0],
            generator=step_gen,
            device="cpu",
            min_timestep=int(cfg.get("min_timestep") or 0),
            max_timestep=int(cfg.get("max_timestep") or 1000),
        ).to(device)
        # input perturbation changes what the UNet sees, not its target (the noise drawn above)
        perturbed = input_perturbation(
            noise,
            generator=step_gen,
            gamma=cfg.get("ip_noise_gamma"),
            random_strength=bool(cfg.get("ip_noise_gamma_random_strength")),
        )
        noisy = self.noise_scheduler.add_noise(latents, perturbed, timesteps)
        with accelerator.autocast():
            cond = self._conditioning(batch.captions, accelerator)
            kwargs = self.family.unet_kwargs(
                cond.to(device, self.weight_dtype) if cond.pooled is not None else cond,
                batch.time_ids.to(device, self.weight_dtype) if batch.time_ids is not None else None,
            )
            pred = self.model.unet(
                noisy.to(self.weight_dtype),
                timesteps,
                encoder_hidden_states=cond.hidden.to(self.weight_dtype),
                **kwargs,
            ).sample
        target = training_target(self.noise_scheduler, latents, noise, timesteps, self.prediction_type)
        loss = diffusion_loss(
            pred.float(),
            target.float(),
            timesteps=timesteps,
            scheduler=self.noise_scheduler,
            min_snr_gamma=cfg.get("min_snr_gamma"),
            prediction_type=self.prediction_type,
            sample_weights=batch.weights.to(device),
            settings=self.loss_settings,
        )
        value = float(loss.detach())  # syncs with the GPU once per step: needed for the NaN check and events
        if not math.isfinite(value):
            raise TrainingError(
                f"loss became {value} at step {self.step + 1}",
                hint="lower the learning rate; with mixed_precision fp16 try bf16, and keep no_half_vae on SDXL",
            )
        accelerator.backward(loss / self.grad_accum)
        return value

    def _optimizer_step(self, accelerator: Accelerator) -> None:
        max_norm = self.cfg.get("max_grad_norm")
        if max_norm:
            accelerator.clip_grad_norm_(self.network.parameters(), float(max_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        max_key_norm = self.cfg.get("scale_weight_norms")
        if max_key_norm:
            self.max_norm_log = self.network.apply_max_norm_regularization(float(max_key_norm)).as_log()

    @contextlib.contextmanager
    def _eval_weights(self, *, back_to_train: bool = True) -> Iterator[None]:
        """Saving and sampling see a schedule-free optimizer's averaged weights (its eval mode), as in kohya."""
        set_optimizer_mode(self.optimizer, self.optimizer_type, train=False)
        try:
            yield
        finally:
            if back_to_train:
                set_optimizer_mode(self.optimizer, self.optimizer_type, train=True)

    # ----------------------------------------------------------------------------------------------- saving
    def _metadata(self, *, final: bool) -> dict[str, str]:
        base = Path(self.cfg["pretrained_model_name_or_path"])
        if not hasattr(self, "_base_hashes"):
            self._base_hashes = (self._base_sha256.result(), legacy_hash_file(base))
        return training_metadata(
            config=self.cfg,
            family=self.config.fm_type,
            session_id=self.session_id,
            started_at=self.started_at,
            finished_at=time.time() if final else None,
            steps=self.step,
            epoch=self.epoch,
            num_train_images=self.plan.num_train_images,
            num_reg_images=self.plan.num_reg_images,
            num_batches_per_epoch=self.plan.batches_per_epoch,
            num_epochs=self.plan.epochs,
            tag_frequency=self.scan.tag_frequency(),
            dataset_dirs=self.scan.dataset_dirs_info(),
            bucket_info={"buckets": self.plan.buckets},
            base_model_path=base,
            base_model_sha256=self._base_hashes[0],
            base_model_legacy_hash=self._base_hashes[1],
            resolution=self.config.resolution,
            output_name=self.output_name,
            prediction_type="v" if self.prediction_type == "v_prediction" else "epsilon",
        )

    def _save_lora(self, name: str, *, final: bool) -> Path:
        path = self.output_dir / f"{name}.safetensors"
        try:
            save_lora(
                path,
                self.network.kohya_state_dict(),
                self._metadata(final=final),
                save_precision=str(self.cfg.get("save_precision") or "float"),
            )
        except OSError as exc:
            raise TrainingError(
                f"could not write {path}: {exc.strerror or exc}",
                hint="free disk space or choose another output_dir; nothing partial was left behind",
            ) from exc
        self.saved.append(path)
        self.events.emit("saved", path=str(path), step=self.step, epoch=self.epoch, final=final)
        return path

    def _rotate_epoch_files(self) -> None:
        keep = self.cfg.get("save_last_n_epochs")
        every = self.config.save_every_n_epochs_for(self.plan.epochs)
        if not keep or not every:
            return
        old_epoch = self.epoch - int(keep) * int(every)
        if old_epoch > 0:
            old = self.output_dir / f"{self.output_name}-{old_epoch:06d}.safetensors"
            if old.exists():
                old.unlink()
                self.events.emit("log", message=f"removed {old.name} (save_last_n_epochs={keep})")

    def _save_state(self) -> None:
        path = save_training_state(
            self.state_dir,
            step=self.step,
            epoch=self.epoch,
            batches_done_in_epoch=self.batches_done,
            network=self.network,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            config_toml=to_canonical_toml(self.config),
            extra={"seed": self.seed},
            keep_last=2,
        )
        self.events.emit("state_saved", path=str(path), step=self.step, epoch=self.epoch)

    def _sample(self, accelerator: Accelerator) -> None:
        raw = str(self.cfg["sample_prompts"])
        text = Path(raw).read_text(encoding="utf-8") if Path(raw).is_file() else raw
        w, h = self.config.resolution
        prompts = parse_sample_prompts(text, default_size=(w, h))
        m = self.model
        paths = generate_samples(
            family=self.config.fm_type,
            unet=m.unet,
            vae=m.vae,
            text_encoders=m.text_encoders,
            tokenizers=m.tokenizers,
            prompts=prompts,
            sampler=str(self.cfg.get("sample_sampler") or "ddim"),
            out_dir=self.output_dir / "sample",
            step=self.step,
            epoch=self.epoch,
            device=accelerator.device,
            dtype=self.weight_dtype,
            prediction_type=self.prediction_type,
            file_prefix=self.output_name,
            clip_skip=int(self.cfg.get("clip_skip") or 1) if self.config.fm_type == "sd_1_5" else None,
            network=self.network,
        )
        for p in paths:
            self.events.emit("sample", path=str(p), step=self.step, epoch=self.epoch)

    # ----------------------------------------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        """Prepare everything, train to the planned step count (or a stop request), save, return the result."""
        cfg = self.cfg
        tune_allocator()
        self.grad_accum = int(cfg.get("gradient_accumulation_steps") or 1)
        facts = detect_facts()
        self.device_plan = plan = plan_device(cfg["mixed_precision"], facts)
        # accelerate keeps process-wide state; a run owns it, so clear what an earlier in-process run (a test, the
        # demo) set before asking for this run's precision.
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(mixed_precision=plan.mixed_precision, cpu=plan.kind == "cpu")
        if plan.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the done event's peak is this run's, not the process's
        self._resume_seed()
        random.seed(self.seed)
        torch.manual_seed(self.seed)
        self.events.emit(
            "start",
            fm_type=self.config.fm_type,
            output_dir=str(self.output_dir),
            device=str(accelerator.device),
            device_kind=device_label(plan, facts),
        )
        for note in plan.notes:
            self.events.emit("warning", message=note)
        self._prepare_data()
        # kohya's metadata needs the base model's sha256: hash it (or take it from the cache) while we load and train
        self._base_sha256 = BackgroundSha256(Path(cfg["pretrained_model_name_or_path"]))
        self._prepare_model(accelerator)
        self._prepare_caches(accelerator)
        self._prepare_optimizer(accelerator)
        self._maybe_resume()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        total = self.plan.total_steps
        self.network.train()
        while self.step < total and not self.stop.is_set():
            if self.batches_done == 0:
                self.epoch += 1
            self._run_epoch(accelerator, total)
            if self.stop.is_set():
                break
            self._end_of_epoch(accelerator)
        return self._finish()

    def _run_epoch(self, accelerator: Accelerator, total: int) -> None:
        batches = epoch_batches(
            self.items,
            self.scan,
            batch_size=int(self.cfg["train_batch_size"]),
            epoch=self.epoch,
            seed=self.seed,
        )
        last = len(batches) - 1
        for index in range(self.batches_done, len(batches)):
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
            step_gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
            loss = self._train_step(self._make_batch(batches[index], rng, step_gen), accelerator, step_gen)
            self.batches_done = index + 1
            if self.batches_done % self.grad_accum and index != last:
                continue
            self._optimizer_step(accelerator)
            self.step += 1
            self.losses.append(loss)
            self.events.step(
                step=self.step,
                epoch=self.epoch,
                loss=loss,
                lrs=current_lrs(self.optimizer, self.lr_scheduler),
                extra=self.max_norm_log,
            )
            if self._upcast_pending and self.step < total:
                self._settle_frozen_weights()
            self._step_checks(accelerator)
            if self.step >= total or self.stop.is_set():
                break
        else:
            self.batches_done = 0  # the epoch ran to its end

    def _settle_frozen_weights(self) -> None:
        """Once, after the first step has shown the run's peak memory: upcast the frozen weights kept in fp16 to
        fp32 when the copies fit the memory left, else keep them (models/upcast.py); said as a "weights" event."""
        self._upcast_pending = False
        m = self.model
        kept = kept_weights([m.unet, m.vae, *m.text_encoders])
        if not kept:
            return
        choice = choose_upcast(kept, memory_facts(), self._upcast_mode)
        if choice.upcast:
            upcast_weights(kept, release_pages=m.path.suffix.lower() in SAFETENSORS_SUFFIXES)
        self.events.emit("weights", **choice.event_fields())

    def _step_checks(self, accelerator: Accelerator) -> None:
        every = self.cfg.get("save_every_n_steps")
        if every and self.step % int(every) == 0 and self.step < self.plan.total_steps:
            with self._eval_weights():
                self._save_lora(f"{self.output_name}-step{self.step:08d}", final=False)
                if self.cfg.get("save_state"):
                    self._save_state()
        every = self.cfg.get("sample_every_n_steps")
        if every and self._sampling_enabled() and self.step % int(every) == 0:
            with self._eval_weights():
                self._sample(accelerator)

    def _end_of_epoch(self, accelerator: Accelerator) -> None:
        self.events.emit("epoch", epoch=self.epoch, step=self.step, avg_loss=self._avg_loss())
        done = self.step >= self.plan.total_steps
        every = self.config.save_every_n_epochs_for(self.plan.epochs)
        saves_epoch = every is not None and every > 0 and self.epoch % int(every) == 0 and not done
        if saves_epoch or (self.state_each_epoch and self.cfg.get("save_state") and not done):
            with self._eval_weights():
                if saves_epoch:
                    self._save_lora(f"{self.output_name}-{self.epoch:06d}", final=False)
                    self._rotate_epoch_files()
                if self.cfg.get("save_state"):
                    self._save_state()
        every = self.cfg.get("sample_every_n_epochs")
        if every and self._sampling_enabled() and self.epoch % int(every) == 0:
            with self._eval_weights():
                self._sample(accelerator)

    def _avg_loss(self) -> float | None:
        return sum(self.losses[-50:]) / len(self.losses[-50:]) if self.losses else None

    def _finish(self) -> TrainResult:
        stopped = self.stop.is_set() and self.step < self.plan.total_steps
        output = None
        set_optimizer_mode(
            self.optimizer, self.optimizer_type, train=False
        )  # what is saved: the eval weights
        if stopped:
            if self.cfg.get("save_state"):
                self._save_state()
            self.events.emit("stopped", step=self.step, epoch=self.epoch)
        else:
            output = self._save_lora(self.output_name, final=True)
            render_after_training(
                self, output
            )  # the epoch comparison grid, when epochs and samples were saved
            if self.cfg.get("save_state") or self.cfg.get("save_state_on_train_end"):
                self._save_state()
            peak = torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None
            self.events.emit("done", step=self.step, epoch=self.epoch, output=str(output), peak_cuda_gb=peak)
        self.network.remove()
        return TrainResult(
            output,
            self.step,
            self.epoch,
            list(self.saved),
            self.losses[-1] if self.losses else None,
            stopped,
            list(self.losses),
        )


def train(
    config: TrainConfig,
    *,
    events: EventLog,
    stop: threading.Event | None = None,
    state_each_epoch: bool = False,
) -> TrainResult:
    """Train a LoRA as `config` says; errors a user can act on are TrainManagementError subclasses."""
    try:
        return Trainer(config, events=events, stop=stop, state_each_epoch=state_each_epoch).run()
    except torch.OutOfMemoryError as exc:
        raise TrainingError(
            "out of memory while training",
            hint="turn on gradient_checkpointing and cache_latents, lower train_batch_size or resolution, "
            "or use mixed_precision bf16/fp16 on a GPU",
        ) from exc
