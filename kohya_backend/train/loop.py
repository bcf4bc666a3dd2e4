"""The training loop, readable top to bottom: prepare (train/setup.py) -> per batch: inputs -> noise -> forward
-> loss -> backward -> step -> save/sample/stop checks -> final save.

The loop polls `stop` so a cancel can save state and leave cleanly. It reads the typed config's fields and the
prepared Setup; nothing here knows which model family it trains (the family's conditioning does).
Data-parallel (train/distributed.py): each process trains its own batch of every round, the processes agree on
the loss and on stopping once per batch, and only rank 0 saves, samples and writes the logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kohya_backend.config.format import to_canonical_toml
from kohya_backend.config.train_config import TrainConfig
from kohya_backend.data.batches import TrainItem, epoch_batches, process_rounds
from kohya_backend.data.dataset_config import kohya_datasets_metadata
from kohya_backend.errors import TrainingError
from kohya_backend.job_folder import SAMPLE_DIR
from kohya_backend.lora.build import TrainedNetwork
from kohya_backend.lora.metadata import BaseModel, DatasetInfo, NetworkSettings, training_metadata
from kohya_backend.lora.network import LoRANetwork
from kohya_backend.lora.save import save_lora
from kohya_backend.models.checkpoint import SAFETENSORS_SUFFIXES
from kohya_backend.models.hashing import legacy_hash_file
from kohya_backend.models.upcast import choose_upcast, kept_weights, memory_facts, upcast_weights
from kohya_backend.train.distributed import Processes
from kohya_backend.train.epoch_grid import render_after_training
from kohya_backend.train.events import EventLog
from kohya_backend.train.inputs import encode_latents, prepare_image
from kohya_backend.train.noise import (
    diffusion_loss,
    input_perturbation,
    sample_noise,
    sample_timesteps,
    training_target,
)
from kohya_backend.train.optim import current_lrs
from kohya_backend.train.optimizers_extra import set_optimizer_mode
from kohya_backend.train.precision import Precision
from kohya_backend.train.process_env import ProcessInfo
from kohya_backend.train.sample import SamplePrompt, generate_samples, parse_sample_prompts
from kohya_backend.train.setup import Setup, caption_for, options_for, prepare
from kohya_backend.train.state import PROGRESS_FILE, latest_state, load_training_state, save_training_state
from kohya_backend.train.tensorboard import TensorBoardLog, tensorboard_run_dir

STATES_KEPT = 2  # save_state keeps the newest two states


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


def _network_settings(config: TrainConfig, network: TrainedNetwork) -> NetworkSettings:
    """What the metadata records of the network that was built (LyCORIS: the network_args it was built with)."""
    if isinstance(network, LoRANetwork):
        return NetworkSettings(
            dim=network.network_dim,
            alpha=network.network_alpha,
            conv_dim=network.conv_dim,
            conv_alpha=network.conv_alpha,
            dropout=network.dropout,
            given_args=config.network_kwargs,
        )
    return NetworkSettings(
        dim=network.network_dim,
        alpha=network.network_alpha,
        module=config.network_module,
        given_args=config.network_kwargs,
    )


def _resume_path(config: TrainConfig) -> Path | None:
    """The state folder `resume` names (a state-* folder, or a folder of them: the newest), or None."""
    if not config.resume:
        return None
    path = Path(config.resume)
    if path.is_dir() and not (path / PROGRESS_FILE).exists():
        found = latest_state(path)
        if found is None:
            raise TrainingError(f"no saved state found in {path}", hint="point `resume` at a state-* folder")
        path = found
    if not (path / PROGRESS_FILE).exists():
        raise TrainingError(
            f"{path} is not a saved training state", hint="point `resume` at a state-* folder"
        )
    return path


class Trainer:
    """One training run of a validated config; `run()` does everything and returns what it saved."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        events: EventLog,
        stop: threading.Event | None = None,
        precision: Precision | None = None,
        state_each_epoch: bool = False,
        processes: Processes | None = None,
    ) -> None:
        self.config = config
        # A job (train --job) saves its state (with save_state) after every epoch, not only with saved epochs.
        self.state_each_epoch = state_each_epoch
        self.precision = precision or Precision.for_run(config.mixed_precision)
        self.procs = processes or Processes.single(self.precision.device)
        self.events = events
        self.stop = stop or threading.Event()
        # Data-parallel: whether any process was asked to stop, as agreed at the last batch.
        self._agreed_stop = False
        self.seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
        self.output_dir = Path(config.output_dir or ".")
        self.session_id = random.SystemRandom().randint(0, 2**32)  # kohya's ss_session_id is an integer
        self.started_at = time.time()
        self.step = 0
        self.epoch = 0
        self.batches_done = 0
        self.saved: list[Path] = []
        self.losses: list[float] = []
        self.max_norm_log: dict[str, float] | None = None  # kohya's max-norm numbers of the last step
        self._prompts: list[SamplePrompt] | None = None
        self._base_hashes: tuple[str | None, str | None] | None = None
        self.setup: Setup | None = None
        self._upcast_pending = (
            False  # kept fp16 frozen weights still to upcast or keep (_settle_frozen_weights)
        )

    @property
    def s(self) -> Setup:
        """The prepared run (after `run()` has prepared it)."""
        if self.setup is None:
            raise RuntimeError("the trainer has not prepared its run yet")
        return self.setup

    # ------------------------------------------------------------------------------------------------ resume
    def _resume_seed(self) -> None:
        """Before anything random happens, take the seed of the run being resumed (it may have been drawn)."""
        path = _resume_path(self.config)
        if path is not None:
            extra = json.loads((path / PROGRESS_FILE).read_text(encoding="utf-8")).get("extra") or {}
            self.seed = int(extra.get("seed", self.seed))

    def _maybe_resume(self) -> None:
        path = _resume_path(self.config)
        if path is None:
            return
        progress = load_training_state(
            path,
            network=self.s.network,
            optimizer=self.s.optimizer,
            lr_scheduler=self.s.lr_scheduler,
            grad_scaler=self.precision.scaler,
        )
        self.step, self.epoch, self.batches_done = (
            progress.step,
            progress.epoch,
            progress.batches_done_in_epoch,
        )
        set_optimizer_mode(
            self.s.optimizer, self.s.optimizer_type, train=True
        )  # a state is saved in eval mode
        self.events.emit("log", message=f"resumed from {path} at step {self.step}, epoch {self.epoch}")
        saved_by = int((progress.extra or {}).get("world_size", 1))
        if saved_by != self.procs.world_size:
            self._replan_after_resume(saved_by)

    def _replan_after_resume(self, saved_by: int) -> None:
        """A state saved by another number of processes: it counts batches, so the epoch goes on where it was;
        with max_train_epochs the run still ends after that many epochs (a step is now another number of batches).
        """
        plan, n = self.s.plan, self.procs.world_size
        note = f"the state was saved by {saved_by} process(es); training goes on with {n}"
        if self.config.max_train_epochs is not None:
            rounds_left = (
                math.ceil(max(0, plan.batches_per_epoch - self.batches_done) / n) if self.batches_done else 0
            )
            this_epoch = math.ceil(rounds_left / self.config.gradient_accumulation_steps)
            total = self.step + this_epoch + max(0, plan.epochs - self.epoch) * plan.steps_per_epoch
            plan.total_steps = self.events.total_steps = total
            note += f", {total} steps in all"
        if self.config.lr_scheduler_type:
            note += (
                "; the lr_scheduler_type schedule goes on from its saved position (counted in the saved run's "
                "processes)"
            )
        self.events.emit("log", message=note)

    # ----------------------------------------------------------------------------------------------- inputs
    def _sample_streams(self, round_no: int, count: int) -> tuple[list[random.Random], list[torch.Generator]]:
        """A Python and a torch random stream per sample, keyed by the sample's place in the global batch (epoch,
        round, slot): a global batch draws the same augmentation and noise however the processes split it."""
        widest = max([self.config.train_batch_size, *(self.s.plan.batch_sizes or [])])  # a dataset_config's
        first = self.procs.info.rank * widest
        keys = [f"{self.seed}/{self.epoch}/{round_no}/{first + i}" for i in range(count)]
        rngs = [random.Random(key) for key in keys]
        gens = [torch.Generator().manual_seed(random.Random(f"torch/{key}").getrandbits(63)) for key in keys]
        return rngs, gens

    def _make_batch(
        self, batch: list[TrainItem], rngs: list[random.Random], gens: list[torch.Generator]
    ) -> _Batch:
        config, s = self.config, self.s
        # a dataset_config gives each subset its own caption and augmentation settings
        options = [options_for(config, s.scan, it) for it in batch]
        flips = [o.flip_aug and rng.random() < 0.5 for o, rng in zip(options, rngs)]
        captions = [
            caption_for(config, s.scan, it, epoch=self.epoch, rng=rng) for it, rng in zip(batch, rngs)
        ]
        if s.latent_cache is not None:
            pairs = [s.latent_cache.get(it, f) for it, f in zip(batch, flips)]
            latents = torch.stack([p[0] for p in pairs])
            geos = [p[1] for p in pairs]
        else:
            geos = [
                prepare_image(it, flip=f, random_crop=o.random_crop, color_aug=o.color_aug, rng=rng)
                for it, f, o, rng in zip(batch, flips, options, rngs)
            ]
            with torch.no_grad():
                latents = encode_latents(
                    s.model.vae,
                    torch.stack([g.pixels for g in geos]),
                    scale=s.model.arch.latent_scale,
                    generator=gens,
                )
        time_ids = s.text.family.time_ids(
            [g.original_size for g in geos], [g.crop for g in geos], [g.target_size for g in geos]
        )
        weights = torch.tensor([config.prior_loss_weight if it.is_reg else 1.0 for it in batch])
        return _Batch(latents, captions, time_ids, weights)

    # ----------------------------------------------------------------------------------------------- step
    def _train_step(self, batch: _Batch, gens: list[torch.Generator]) -> float:
        config, s, precision = self.config, self.s, self.precision
        device, dtype = precision.device, precision.weight_dtype
        latents = batch.latents.to(device, torch.float32)
        # Each sample draws from its own CPU generator (same numbers on any device, however the global batch is
        # split), in a fixed order: noise, timestep, perturbation.
        noise = torch.cat(
            [
                sample_noise(
                    latents[i : i + 1],
                    generator=gen,
                    noise_offset=config.noise_offset,
                    noise_offset_random_strength=config.noise_offset_random_strength,
                    adaptive_noise_scale=config.adaptive_noise_scale,
                    multires_iterations=config.multires_noise_iterations,
                    multires_discount=config.multires_noise_discount,
                )
                for i, gen in enumerate(gens)
            ]
        )
        timesteps = torch.cat(
            [
                sample_timesteps(
                    1,
                    generator=gen,
                    device="cpu",
                    min_timestep=config.min_timestep or 0,
                    max_timestep=config.max_timestep or 1000,
                )
                for gen in gens
            ]
        ).to(device)
        # input perturbation changes what the UNet sees, not its target (the noise drawn above)
        perturbed = torch.cat(
            [
                input_perturbation(
                    noise[i : i + 1],
                    generator=gen,
                    gamma=config.ip_noise_gamma,
                    random_strength=config.ip_noise_gamma_random_strength,
                )
                for i, gen in enumerate(gens)
            ]
        )
        noisy = s.noise_scheduler.add_noise(latents, perturbed, timesteps)

        def forward() -> torch.Tensor:  # everything that runs through the LoRA: DDP must see it
            with precision.autocast():
                cond = s.text(batch.captions)
                kwargs = s.text.family.unet_kwargs(
                    cond.to(device, dtype) if cond.pooled is not None else cond,
                    batch.time_ids.to(device, dtype) if batch.time_ids is not None else None,
                )
                out: torch.Tensor = s.model.unet(
                    noisy.to(dtype), timesteps, encoder_hidden_states=cond.hidden.to(dtype), **kwargs
                ).sample
                return out

        pred = self.procs.forward(forward)
        target = training_target(s.noise_scheduler, latents, noise, timesteps, config.prediction_type)
        loss = diffusion_loss(
            pred.float(),
            target.float(),
            timesteps=timesteps,
            scheduler=s.noise_scheduler,
            min_snr_gamma=config.min_snr_gamma,
            prediction_type=config.prediction_type,
            sample_weights=batch.weights.to(device),
            settings=s.loss_settings,
        )
        # Syncs with the GPU once per batch: the NaN check and events need it. Data-parallel, this is also where
        # the processes agree on the mean loss and on stopping (all of them fail, or stop, at the same batch).
        value, self._agreed_stop = self.procs.agree(loss, self.stop.is_set())
        if not math.isfinite(value):
            raise TrainingError(
                f"loss became {value} at step {self.step + 1}",
                hint="lower the learning rate; with mixed_precision fp16 try bf16, and keep no_half_vae on SDXL",
            )
        precision.backward(loss / self.config.gradient_accumulation_steps)
        return value

    def _optimizer_step(self) -> None:
        s = self.s
        if self.precision.step(s.optimizer, s.network.parameters(), self.config.max_grad_norm):
            for _ in range(s.lr_steps_per_step):  # kohya's data-parallel schedules advance once per process
                s.lr_scheduler.step()  # an fp16 step skipped for overflowing gradients leaves the schedule as it was
        s.optimizer.zero_grad(set_to_none=True)
        if self.config.scale_weight_norms:
            self.max_norm_log = s.network.apply_max_norm_regularization(
                self.config.scale_weight_norms
            ).as_log()

    @contextlib.contextmanager
    def _eval_weights(self) -> Iterator[None]:
        """Saving and sampling see a schedule-free optimizer's averaged weights (its eval mode), as in kohya."""
        set_optimizer_mode(self.s.optimizer, self.s.optimizer_type, train=False)
        try:
            yield
        finally:
            set_optimizer_mode(self.s.optimizer, self.s.optimizer_type, train=True)

    # ----------------------------------------------------------------------------------------------- saving
    def _base_model(self) -> BaseModel:
        """The base model as kohya records it: a file's name and hashes; for a folder the name and "IsADirectory"
        (what sd-scripts' hash helpers answer); a hub id as given, without hashes."""
        s, given = self.s, str(self.config.pretrained_model_name_or_path)
        if self._base_hashes is None:
            if s.base_sha256 is not None:
                self._base_hashes = (s.base_sha256.result(), legacy_hash_file(s.base_model))
            elif Path(given).is_dir():
                self._base_hashes = ("IsADirectory", "IsADirectory")
            else:
                self._base_hashes = (None, None)
        local = Path(given).exists()
        return BaseModel(
            Path(given) if local else None,
            self._base_hashes[0],
            self._base_hashes[1],
            name=None if local else given,
        )

    def _dataset_info(self) -> DatasetInfo:
        """Tags, folders and buckets as kohya records them (ss_datasets for a dataset_config run)."""
        scan, plan = self.s.scan, self.s.plan
        reg_dirs = scan.kohya_dataset_dirs(reg=True)
        if scan.datasets:
            datasets, tags, dirs = kohya_datasets_metadata(scan, plan.bucket_infos)
            return DatasetInfo(tags, dirs, reg_dirs, plan.bucket_infos[0], datasets)
        return DatasetInfo(
            scan.tag_frequency(), scan.kohya_dataset_dirs(reg=False), reg_dirs, plan.bucket_infos[0]
        )

    def _metadata(self, *, final: bool) -> dict[str, str]:
        config, s = self.config, self.s
        network = s.network
        return training_metadata(
            config=config,
            network=_network_settings(config, network),
            optimizer=s.optimizer_name,
            session_id=self.session_id,
            started_at=self.started_at,
            finished_at=time.time() if final else None,
            steps=self.step,
            epoch=self.epoch,
            max_train_steps=s.plan.total_steps,
            num_epochs=s.plan.epochs,
            num_batches_per_epoch=s.plan.batches_per_process,
            num_processes=self.procs.world_size,
            num_train_images=s.plan.num_train_images,
            num_reg_images=s.plan.num_reg_images,
            dataset=self._dataset_info(),
            base_model=self._base_model(),
        )

    def _save_lora(self, name: str, *, final: bool) -> Path:
        path = self.output_dir / f"{name}.safetensors"
        try:
            save_lora(
                path,
                self.s.network.kohya_state_dict(),
                self._metadata(final=final),
                save_precision=self.config.save_precision,
            )
        except OSError as exc:
            raise TrainingError(
                f"could not write {path}: {exc.strerror or exc}",
                hint="free disk space or choose another output_dir; nothing partial was left behind",
            ) from exc
        self.saved.append(path)
        self.events.emit("saved", path=str(path), step=self.step, epoch=self.epoch, final=final)
        return path

    def _rotate_epoch_files(self, every: int) -> None:
        keep = self.config.save_last_n_epochs
        if not keep:
            return
        old_epoch = self.epoch - keep * every
        if old_epoch > 0:
            old = self.output_dir / f"{self.config.output_stem}-{old_epoch:06d}.safetensors"
            if old.exists():
                old.unlink()
                self.events.emit("log", message=f"removed {old.name} (save_last_n_epochs={keep})")

    def _save_state(self) -> None:
        s = self.s
        path = save_training_state(
            self.config.state_dir,
            step=self.step,
            epoch=self.epoch,
            batches_done_in_epoch=self.batches_done,
            network=s.network,
            optimizer=s.optimizer,
            lr_scheduler=s.lr_scheduler,
            config_toml=to_canonical_toml(self.config),
            extra={"seed": self.seed, "world_size": self.procs.world_size},
            keep_last=STATES_KEPT,
            grad_scaler=self.precision.scaler,
        )
        self.events.emit("state_saved", path=str(path), step=self.step, epoch=self.epoch)

    def _sample(self) -> None:
        paths = self.render_samples(
            self.sample_prompts(), self.output_dir / SAMPLE_DIR, self.config.output_stem
        )
        for p in paths:
            self.events.emit("sample", path=str(p), step=self.step, epoch=self.epoch)

    def sample_prompts(self) -> list[SamplePrompt]:
        """The config's sample prompts (a file's or inline text), read once per run."""
        if self._prompts is None:
            raw = str(self.config.sample_prompts)
            text = Path(raw).read_text(encoding="utf-8") if Path(raw).is_file() else raw
            self._prompts = parse_sample_prompts(text, default_size=self.config.resolution)
        return self._prompts

    def render_samples(
        self, prompts: list[SamplePrompt], out_dir: Path, file_prefix: str = "sample"
    ) -> list[Path]:
        """Render `prompts` with the model and the LoRA as they are now (per-step samples, the epoch grid)."""
        config, model = self.config, self.s.model
        return generate_samples(
            family=config.fm_type,
            unet=model.unet,
            vae=model.vae,
            text_encoders=model.text_encoders,
            tokenizers=model.tokenizers,
            prompts=prompts,
            sampler=config.sample_sampler,
            out_dir=out_dir,
            step=self.step,
            epoch=self.epoch,
            device=self.precision.device,
            dtype=self.precision.weight_dtype,
            prediction_type=config.prediction_type,
            file_prefix=file_prefix,
            clip_skip=config.effective_clip_skip,
            network=self.s.network,
        )

    def _tensorboard(self) -> TensorBoardLog | None:
        """With logging_dir (log_with = "tensorboard"), TensorBoard event files as kohya writes them."""
        config = self.config
        if not config.logging_dir:
            return None
        run_dir = tensorboard_run_dir(
            Path(config.logging_dir),
            log_prefix=config.log_prefix,
            tracker_name=config.log_tracker_name,
            started=self.started_at,
        )
        log = TensorBoardLog(run_dir, lr_names=[str(g.get("name")) for g in self.s.optimizer.param_groups])
        self.events.subscribe(log)
        self.events.emit("log", message=f"TensorBoard logs: {run_dir}")
        return log

    # ----------------------------------------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        """Prepare everything, train to the planned step count (or a stop request), save, return the result."""
        if self.precision.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the done event's peak is this run's, not the process's
        self._resume_seed()
        self.seed = self.procs.broadcast_int(self.seed)  # a seed drawn at random: rank 0's, everywhere
        random.seed(self.seed)
        torch.manual_seed(self.seed)
        self.events.emit(
            "start",
            fm_type=self.config.fm_type,
            output_dir=str(self.output_dir),
            device=str(self.precision.device),
            device_kind=self.precision.label,
            processes=self.procs.world_size,
        )
        if self.procs.world_size > 1:
            n, batch = self.procs.world_size, self.config.train_batch_size
            self.events.emit(
                "log",
                message=f"data-parallel training in {self.procs.describe()}: train_batch_size {batch} per "
                f"process, {n * batch} images per step",
            )
        for note in self.precision.notes:
            self.events.emit("warning", message=note)
        self.setup = prepare(self.config, self.precision, self.events, seed=self.seed, processes=self.procs)
        weights = self.s.weight_plan  # fp16 weights kept at load may be upcast once the first step has run
        self._upcast_pending = weights.keep_file_precision and weights.compute_dtype is None
        self._maybe_resume()
        self.procs.wrap(self.s.network, varying_graph=self._varying_graph())
        tensorboard = None
        if self.procs.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tensorboard = self._tensorboard()
        try:
            total = self.s.plan.total_steps
            self.s.network.train()
            self._agreed_stop = self.procs.any(self.stop.is_set())
            while self.step < total and not self._stopping():
                if self.batches_done == 0:
                    self.epoch += 1
                self._run_epoch(total)
                if self._stopping():
                    break
                self._end_of_epoch()
            return self._finish()
        finally:
            if tensorboard is not None:
                tensorboard.close()

    def _stopping(self) -> bool:
        """Whether to stop: this process's flag alone, or data-parallel what all agreed at the last batch (every
        process must leave the loop at the same batch)."""
        return self.stop.is_set() if self.procs.world_size == 1 else self._agreed_stop

    def _varying_graph(self) -> bool:
        """Whether the LoRA parameters that get gradients change from step to step: LyCORIS' module_dropout skips
        whole modules at random (DDP must then look for the unused ones every step)."""
        dropout = self.config.network_kwargs.get("module_dropout")
        return bool(dropout and float(dropout) > 0)

    def _run_epoch(self, total: int) -> None:
        batches = epoch_batches(
            self.s.items,
            self.s.scan,
            batch_size=self.config.train_batch_size,
            epoch=self.epoch,
            seed=self.seed,
            batch_sizes=self.s.plan.batch_sizes,
        )
        n, rank = self.procs.world_size, self.procs.info.rank
        start = self.batches_done
        rounds = process_rounds(len(batches), n, start=start)  # one batch per process per round
        last = len(rounds) - 1
        for k, share in enumerate(rounds):
            position = start + k * n  # the epoch's batch this round starts at
            round_no = position // n
            sync = (round_no + 1) % self.config.gradient_accumulation_steps == 0 or k == last
            batch = batches[share[rank]]
            with self.procs.accumulate(sync=sync):
                rngs, gens = self._sample_streams(round_no, len(batch))
                loss = self._train_step(self._make_batch(batch, rngs, gens), gens)
            self.batches_done = min(len(batches), position + n)
            if not sync:
                continue
            self._optimizer_step()
            self.step += 1
            self.losses.append(loss)
            self.events.step(
                step=self.step,
                epoch=self.epoch,
                loss=loss,
                lrs=current_lrs(self.s.optimizer, self.s.lr_scheduler),
                extra=self.max_norm_log,
            )
            if self._upcast_pending and self.step < total:
                self._settle_frozen_weights()
            self._step_checks()
            if self.step >= total or self._stopping():
                break
        else:
            self.batches_done = 0  # the epoch ran to its end

    def _settle_frozen_weights(self) -> None:
        """Once, after the first step has shown the run's peak memory: upcast the frozen weights kept in fp16 to
        fp32 when the copies fit the memory left, else keep them (models/upcast.py); said as a "weights" event.
        Rank 0 decides for every process of a data-parallel run (they share its machine: the copies count once
        per process) and broadcasts the choice, so all of them compute alike."""
        self._upcast_pending = False
        m = self.s.model
        kept = kept_weights([m.unet, m.vae, *m.text_encoders])
        if not kept:
            return  # the same modules in every process: all of them return here, or none
        choice = None
        if self.procs.is_main:
            choice = choose_upcast(
                kept, memory_facts(), self.s.frozen_weights_mode, processes=self.procs.world_size
            )
        upcast = bool(self.procs.broadcast_int(int(choice.upcast) if choice is not None else 0))
        if upcast:
            upcast_weights(kept, release_pages=m.path.suffix.lower() in SAFETENSORS_SUFFIXES)
        if choice is not None:
            self.events.emit("weights", **choice.event_fields())

    def _step_checks(self) -> None:
        config = self.config
        if not self.procs.is_main:
            return  # rank 0 saves and samples; the others wait for it at the next batch
        every = config.save_every_n_steps
        if every and self.step % every == 0 and self.step < self.s.plan.total_steps:
            with self._eval_weights():
                self._save_lora(f"{config.output_stem}-step{self.step:08d}", final=False)
                if config.save_state:
                    self._save_state()
        every = config.sample_every_n_steps
        if every and config.sampling_enabled and self.step % every == 0:
            with self._eval_weights():
                self._sample()

    def _end_of_epoch(self) -> None:
        config = self.config
        self.events.emit("epoch", epoch=self.epoch, step=self.step, avg_loss=self._avg_loss())
        if not self.procs.is_main:
            return
        done = self.step >= self.s.plan.total_steps
        every = config.save_every_n_epochs_for(self.s.plan.epochs)
        saves_epoch = every is not None and self.epoch % every == 0 and not done
        if saves_epoch or (self.state_each_epoch and config.save_state and not done):
            with self._eval_weights():
                if saves_epoch and every is not None:
                    self._save_lora(f"{config.output_stem}-{self.epoch:06d}", final=False)
                    self._rotate_epoch_files(every)
                if config.save_state:
                    self._save_state()
        sample_every = config.sample_every_n_epochs
        if sample_every and config.sampling_enabled and self.epoch % sample_every == 0:
            with self._eval_weights():
                self._sample()

    def _avg_loss(self) -> float | None:
        return sum(self.losses[-50:]) / len(self.losses[-50:]) if self.losses else None

    def _finish(self) -> TrainResult:
        stopped = self._stopping() and self.step < self.s.plan.total_steps
        output = None
        set_optimizer_mode(
            self.s.optimizer, self.s.optimizer_type, train=False
        )  # what is saved: the eval weights
        if stopped:
            if self.config.save_state and self.procs.is_main:
                self._save_state()
            self.events.emit("stopped", step=self.step, epoch=self.epoch)
        elif self.procs.is_main:  # the others' work is done: rank 0 saves
            output = self._save_lora(self.config.output_stem, final=True)
            render_after_training(
                self, output
            )  # the epoch comparison grid, when epochs and samples were saved
            if self.config.save_state or self.config.save_state_on_train_end:
                self._save_state()
            peak = torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None
            self.events.emit("done", step=self.step, epoch=self.epoch, output=str(output), peak_cuda_gb=peak)
        self.s.network.remove()
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
    processes: ProcessInfo | None = None,
) -> TrainResult:
    """Train a LoRA as `config` says, alone or as one of `processes` (data-parallel); errors a user can act on are
    TrainManagementError subclasses."""
    precision = Precision.for_run(config.mixed_precision)
    try:
        with Processes.start(processes or ProcessInfo(), precision.device) as procs:
            precision = dataclasses.replace(precision, device=procs.device)
            trainer = Trainer(
                config,
                events=events,
                stop=stop,
                precision=precision,
                state_each_epoch=state_each_epoch,
                processes=procs,
            )
            return trainer.run()
    except torch.OutOfMemoryError as exc:
        raise TrainingError(
            "out of memory while training",
            hint="turn on gradient_checkpointing and cache_latents, lower train_batch_size or resolution, "
            "or use mixed_precision bf16/fp16 on a GPU",
        ) from exc
