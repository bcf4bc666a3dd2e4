"""Every key the config declares *used* changes what the trainer does or writes; every *compat* key changes nothing
but says so; every *fixed* key refuses any other value.

Each used key names the behaviour it changes (its Effect's `behaviour`). For each, a short real training of the
tiny SD 1.5 model (or, for captions and buckets, the trainer's own caption and plan functions) runs with the key at
a value other than its default, and the observed behaviour is compared with the same run without it. A key added
to the config without a row in ALTERNATIVES fails `test_every_used_key_has_an_alternative`.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from kohya_backend.assets.checkpoints import write_checkpoint
from kohya_backend.assets.dataset import write_demo_dataset
from kohya_backend.assets.tokenizer import _CORPUS, TINY_MERGES, learn_merges, write_clip_bpe_files
from kohya_backend.config.schema import SCHEMA
from kohya_backend.config.train_config import TrainConfig
from kohya_backend.config.validate import validate_config
from kohya_backend.errors import ConfigError
from kohya_backend.lora.save import load_lora
from kohya_backend.train.events import EventLog
from kohya_backend.train.loop import Trainer
from kohya_backend.train.plan import plan_for, scan_for
from kohya_backend.train.precision import Precision
from kohya_backend.train.setup import caption_for

pytestmark = pytest.mark.slow

BUCKETS = {
    "enable_bucket": True,
    "resolution": "128,128",
    "min_bucket_reso": 64,
    "max_bucket_reso": 256,
    "bucket_reso_steps": 64,
}
LOGS = {"logging_dir": "{run}/logs"}
PROMPTS = {"sample_prompts": "{assets}/prompts.txt", "sample_every_n_steps": 2}
CACHED_TEXT = {"network_train_unet_only": True, "cache_text_encoder_outputs": True}
BF16_WEIGHTS = {"_precision": "bf16"}

# key -> (a value other than the default, the keys it needs to take effect)
ALTERNATIVES: dict[str, tuple[Any, dict[str, Any]]] = {
    "pretrained_model_name_or_path": ("{assets}/other.safetensors", {}),
    "v_parameterization": (True, {}),
    "no_half_vae": (True, BF16_WEIGHTS),
    "tokenizer_cache_dir": ("{assets}/other_tokenizer", {}),
    "train_data_dir": ("{assets}/other_data", {}),
    "dataset_config": ("{assets}/dataset.toml", {}),  # other images, with their own options
    "reg_data_dir": ("{assets}/reg", {}),
    "prior_loss_weight": (0.25, {"reg_data_dir": "{assets}/reg", "max_train_steps": 4}),  # a whole epoch
    "caption_extension": (".caption", {}),
    "shuffle_caption": (True, {}),
    "keep_tokens": (2, {"shuffle_caption": True}),
    "keep_tokens_separator": ("|||", {}),
    "caption_prefix": ("a photo of", {}),
    "caption_suffix": ("hq", {}),
    "caption_dropout_rate": (0.5, {}),
    "caption_dropout_every_n_epochs": (2, {}),
    "caption_tag_dropout_rate": (0.5, {}),
    # Drawn per image: 6 steps of 2 images, so that by chance no image flips (1 in 4096) or none is recoloured
    # (each is with a third's chance: under 1 in 100), which 2 steps left to a 1 in 16 and 1 in 5 chance.
    "flip_aug": (True, {"max_train_steps": 6}),
    "random_crop": (True, {}),
    "color_aug": (True, {"max_train_steps": 6}),
    "resolution": ("192,192", BUCKETS),
    "enable_bucket": (False, BUCKETS),
    "min_bucket_reso": (128, BUCKETS),
    "max_bucket_reso": (192, BUCKETS),
    # 80x64 images: a 576x448 bucket in steps of 64, 512x512 in steps of 128
    "bucket_reso_steps": (
        128,
        {**BUCKETS, "resolution": "512,512", "min_bucket_reso": 256, "max_bucket_reso": 1024},
    ),
    "bucket_no_upscale": (True, BUCKETS),
    "cache_latents": (True, {}),
    "cache_latents_to_disk": (True, {"cache_latents": True}),
    "vae_batch_size": (2, {"cache_latents": True}),
    "cache_text_encoder_outputs": (True, {"network_train_unet_only": True}),
    "cache_text_encoder_outputs_to_disk": (True, CACHED_TEXT),
    "network_dim": (8, {}),
    "network_alpha": (1.0, {}),
    "network_args": (["conv_dim=4"], {}),
    "network_dropout": (0.5, {}),
    "network_weights": ("{assets}/start.safetensors", {}),
    "network_train_unet_only": (True, {}),
    "network_train_text_encoder_only": (True, {}),
    "training_comment": ("made for a test", {}),
    "optimizer_type": ("SGDNesterov", {}),
    "optimizer_args": (["weight_decay=0.5", "betas=0.5,0.9"], {}),
    "learning_rate": (1e-2, {}),
    "unet_lr": (1e-2, {}),
    "text_encoder_lr": (1e-2, {}),
    "lr_scheduler": ("linear", {}),
    "lr_warmup_steps": (1, {"lr_scheduler": "constant_with_warmup"}),
    "lr_scheduler_num_cycles": (2, {"lr_scheduler": "cosine_with_restarts"}),
    "lr_scheduler_power": (2.0, {"lr_scheduler": "polynomial"}),
    "lr_scheduler_args": (["num_cycles=1.0"], {"lr_scheduler": "cosine"}),
    "max_grad_norm": (1e-4, {}),
    "train_batch_size": (1, {}),
    "max_train_steps": (3, {}),
    "max_train_epochs": (2, {}),
    "gradient_accumulation_steps": (2, {}),
    "gradient_checkpointing": (True, {}),
    "mixed_precision": ("bf16", {}),
    "seed": (8, {}),
    "clip_skip": (2, {}),
    "max_token_length": (150, {}),
    "noise_offset": (0.1, {}),
    "min_snr_gamma": (5.0, {}),
    "min_timestep": (500, {}),
    "max_timestep": (500, {}),
    "output_dir": ("{run}/elsewhere", {}),
    "output_name": ("u", {}),
    "save_precision": ("fp16", {}),
    "save_every_n_epochs": (1, {"max_train_epochs": 2}),
    "save_every_n_steps": (1, {}),
    "save_n_epoch_ratio": (2, {"max_train_epochs": 2}),
    "save_last_n_epochs": (1, {"max_train_epochs": 3, "save_every_n_epochs": 1}),
    "save_state": (True, {}),
    "save_state_on_train_end": (True, {}),
    "resume": ("{assets}/state", {"max_train_steps": 3}),
    "logging_dir": ("{run}/logs", {}),
    "log_prefix": ("p-", LOGS),
    "log_tracker_name": ("tracker", LOGS),
    "sample_prompts": ("{assets}/prompts.txt", {"sample_every_n_steps": 2}),
    "sample_every_n_epochs": (1, {"sample_prompts": "{assets}/prompts.txt"}),
    "sample_every_n_steps": (1, {"sample_prompts": "{assets}/prompts.txt"}),
    "sample_sampler": ("euler", PROMPTS),
    "network_module": ("lycoris.kohya", {}),
    "scale_weight_norms": (1e-3, {}),
    "lr_scheduler_type": ("LinearLR", {}),  # torch defaults: from a third of the rate up over 5 steps
    "noise_offset_random_strength": (True, {"noise_offset": 0.1}),
    "adaptive_noise_scale": (0.5, {"noise_offset": 0.1}),
    "multires_noise_iterations": (4, {}),
    "multires_noise_discount": (0.8, {"multires_noise_iterations": 4}),
    "ip_noise_gamma": (0.5, {}),
    "ip_noise_gamma_random_strength": (True, {"ip_noise_gamma": 0.5}),
    "zero_terminal_snr": (True, {"v_parameterization": True}),
    "loss_type": ("l1", {}),
    "huber_schedule": ("constant", {"loss_type": "huber"}),
    "huber_c": (0.5, {"loss_type": "huber"}),
    "huber_scale": (3.0, {"loss_type": "huber", "huber_schedule": "constant"}),
    "debiased_estimation_loss": (True, {}),
    "scale_v_pred_loss_like_noise_pred": (True, {"v_parameterization": True}),
    "v_pred_like_loss": (0.5, {}),
}
VOLATILE_METADATA = ("ss_session_id", "ss_training_started_at", "ss_training_finished_at", "modelspec.date")


def _behaviour(key: str) -> str:
    behaviour = SCHEMA[key].effect.behaviour
    assert behaviour is not None, key
    return behaviour


def _dataset(root: Path, seed: int) -> Path:
    """Images of three aspect ratios (buckets and crops differ), captions with kohya's keep-tokens separator."""
    write_demo_dataset(root, folder="1_demo", count=2, size=(80, 64), seed=seed)
    write_demo_dataset(root, folder="1_tall", count=1, size=(64, 80), seed=seed + 1)
    write_demo_dataset(root, folder="1_wide", count=1, size=(256, 64), seed=seed + 2)
    for caption in root.glob("*/*.txt"):
        tags = caption.read_text().strip().split(", ")
        caption.write_text(f"{tags[0]} ||| {', '.join(tags[1:])}, small, bright\n")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("effects")
    write_clip_bpe_files(root / "tokenizer", learn_merges(_CORPUS, TINY_MERGES))
    write_clip_bpe_files(root / "other_tokenizer", learn_merges(_CORPUS, TINY_MERGES // 3))
    write_checkpoint(root / "model.safetensors", "sd_1_5", size="tiny", seed=0)
    write_checkpoint(root / "other.safetensors", "sd_1_5", size="tiny", seed=1)
    _dataset(root / "data", seed=0)
    _dataset(root / "other_data", seed=10)
    write_demo_dataset(root / "reg", folder="1_person", count=2, size=(64, 64), seed=20)
    (root / "prompts.txt").write_text("demo, red circle --w 64 --h 64 --s 2 --d 1\n")
    (root / "dataset.toml").write_text(
        "[[datasets]]\nresolution = 64\nbatch_size = 2\n\n[[datasets.subsets]]\n"
        f"image_dir = '{(root / 'other_data' / '1_demo').as_posix()}'\ncaption_extension = '.txt'\n"
        "flip_aug = true\n"
    )
    # another run's weights and state (another seed): what network_weights and resume start from
    first = _observe(root, root / "first", {"save_state": True, "output_name": "start", "seed": 99})
    shutil.move(str(first.output), root / "start.safetensors")
    shutil.move(str(root / "first" / "out" / "start-state"), root / "state")
    return root


@dataclass
class Observed:
    """What one run did and wrote, per behaviour."""

    output: Path | None
    behaviours: dict[str, Any] = field(default_factory=dict)


BASE: dict[str, Any] = {
    "pretrained_model_name_or_path": "{assets}/model.safetensors",
    "tokenizer_cache_dir": "{assets}/tokenizer",
    "train_data_dir": "{run}/data",
    "output_dir": "{run}/out",
    "output_name": "t",
    "caption_extension": ".txt",
    "resolution": "64,64",
    "train_batch_size": 2,
    "max_train_steps": 2,
    "network_dim": 4,
    "network_alpha": 4,
    "learning_rate": 1e-3,
    "seed": 7,
}


def _config(assets: Path, run: Path, overrides: dict[str, Any]) -> TrainConfig:
    values = {**BASE, **{k: v for k, v in overrides.items() if not k.startswith("_")}}
    resolved = {
        k: v.format(run=run.as_posix(), assets=assets.as_posix()) if isinstance(v, str) else v
        for k, v in values.items()
    }
    return validate_config(resolved, "sd_1_5")


def _captions(config: TrainConfig) -> list[str]:
    scan = scan_for(config)
    items = plan_for(config, scan).items
    return [
        caption_for(config, scan, item, epoch=epoch, rng=random.Random(f"{epoch}/{index}"))
        for epoch in (1, 2, 3)
        for index, item in enumerate(items)
    ]


def _buckets(config: TrainConfig) -> list[tuple[str, tuple[int, int]]]:
    return sorted((item.image.path.name, item.bucket) for item in plan_for(config, scan_for(config)).items)


def _files(run: Path) -> list[tuple[str, str]]:
    """Every file the run wrote (time stamps in names blanked), with the tensor dtypes of LoRA files."""
    found = []
    for path in sorted(run.rglob("*")):
        if not path.is_file() or (path.parent.parent == run / "data" and path.suffix in (".png", ".txt")):
            continue
        relative = path.relative_to(run).as_posix()
        parts = ["<time>" if part.isdigit() and len(part) == 14 else part for part in relative.split("/")]
        name = "events" if parts[-1].startswith("events.out.tfevents") else parts[-1]
        detail = ""
        if path.suffix == ".safetensors" and "state" not in relative:
            with safe_open(str(path), "pt") as handle:
                names = handle.keys()
                detail = ",".join(sorted({str(handle.get_slice(k).get_dtype()) for k in names}))
        found.append(("/".join([*parts[:-1], name]), detail))
    return found


def _observe(assets: Path, run: Path, overrides: dict[str, Any]) -> Observed:
    shutil.copytree(assets / "data", run / "data")
    config = _config(assets, run, overrides)
    precision = None
    if overrides.get("_precision") == "bf16":
        precision = Precision(torch.device("cpu"), torch.bfloat16, torch.bfloat16)
    events: list[dict] = []
    log = EventLog(None, console=None)
    log.subscribe(events.append)
    trainer = Trainer(config, events=log, precision=precision)
    result = trainer.run()
    assert result.output is not None
    weights, metadata = load_lora(result.output)
    samples = [np.asarray(Image.open(p)).tobytes() for p in sorted(run.rglob("sample/*.png"))]
    observed = Observed(result.output)
    observed.behaviours = {
        "training": {k: v.float() for k, v in weights.items()},
        "files": _files(run),
        "metadata": {k: v for k, v in metadata.items() if k not in VOLATILE_METADATA},
        "caching": [(e["what"], e["done"], e["total"]) for e in events if e["kind"] == "caching"],
        "samples": samples,
        "setup": {"unet_checkpointing": trainer.s.model.unet.is_gradient_checkpointing},
    }
    return observed


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return bool(a == b)


_RUNS: dict[str, Observed] = {}


def _observed(assets: Path, tmp_path_factory: pytest.TempPathFactory, overrides: dict[str, Any]) -> Observed:
    """A run's observation, shared by every test that asks for the same overrides."""
    key = repr(sorted(overrides.items(), key=lambda kv: kv[0]))
    if key not in _RUNS:
        _RUNS[key] = _observe(assets, tmp_path_factory.mktemp("run"), overrides)
    return _RUNS[key]


def _behaviour_of(
    assets: Path, tmp_path_factory: pytest.TempPathFactory, overrides: dict[str, Any], behaviour: str
) -> Any:
    if behaviour in ("captions", "buckets"):
        config = _config(
            assets, assets, overrides
        )  # no training: the trainer's own caption and plan functions
        return _captions(config) if behaviour == "captions" else _buckets(config)
    return _observed(assets, tmp_path_factory, overrides).behaviours[behaviour]


def test_every_used_key_has_an_alternative() -> None:
    used = {k for k, spec in SCHEMA.items() if spec.effect.kind == "used"}
    assert sorted(used - set(ALTERNATIVES)) == [], "add a value that should change the trainer's behaviour"
    assert sorted(set(ALTERNATIVES) - used) == []
    for key, (value, context) in ALTERNATIVES.items():
        assert value != {**BASE, **context}.get(key, SCHEMA[key].default_for("sd_1_5")), key


def test_a_run_observed_twice_is_the_same(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The comparison below means something only if an unchanged run gives the same observation."""
    once = _observe(assets, tmp_path_factory.mktemp("again"), {**LOGS, **PROMPTS})
    twice = _observe(assets, tmp_path_factory.mktemp("again"), {**LOGS, **PROMPTS})
    for behaviour, value in once.behaviours.items():
        assert _same(value, twice.behaviours[behaviour]), behaviour
    assert once.behaviours["samples"] and any("events" in f for f, _ in once.behaviours["files"])


@pytest.mark.parametrize("key", sorted(ALTERNATIVES))
def test_each_used_key_changes_what_the_trainer_does(
    assets: Path, tmp_path_factory: pytest.TempPathFactory, key: str
) -> None:
    value, context = ALTERNATIVES[key]
    behaviour = _behaviour(key)
    without = _behaviour_of(assets, tmp_path_factory, context, behaviour)
    with_key = _behaviour_of(assets, tmp_path_factory, {**context, key: value}, behaviour)
    assert not _same(without, with_key), f"{key} = {value!r} did not change the {behaviour}"


COMPAT_VALUES = {
    "xformers": True,
    "sdpa": True,
    "mem_eff_attn": True,
    "lowram": True,
    "highvram": True,
    "max_data_loader_n_workers": 0,
    "persistent_data_loader_workers": True,
}


def test_compat_keys_change_nothing_and_say_so(
    assets: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    compat = {k for k, spec in SCHEMA.items() if spec.effect.kind == "compat"}
    assert set(COMPAT_VALUES) == compat
    config = _config(assets, assets, COMPAT_VALUES)
    warned = {w.key: w.message for w in config.warnings}
    for key in compat:
        assert warned[key] == f"{key} {SCHEMA[key].effect.text}"
    plain = _observed(assets, tmp_path_factory, {})
    every = _observed(assets, tmp_path_factory, COMPAT_VALUES)
    for behaviour in ("training", "files", "caching", "setup"):
        assert _same(plain.behaviours[behaviour], every.behaviours[behaviour]), behaviour


# fixed key -> (the value it accepts, a value kohya accepts that it refuses)
FIXED = {
    "v2": (False, True),
    "save_model_as": ("safetensors", "ckpt"),
    "log_with": ("tensorboard", "wandb"),
}


def test_fixed_keys_refuse_any_other_value() -> None:
    assert set(FIXED) == {k for k, spec in SCHEMA.items() if spec.effect.kind == "fixed"}
    for key, (accepted, refused) in FIXED.items():
        config = validate_config({key: accepted, "logging_dir": "logs"}, "sd_1_5", require_paths=False)
        assert getattr(config, key) == accepted
        with pytest.raises(ConfigError) as info:
            validate_config({key: refused, "logging_dir": "logs"}, "sd_1_5", require_paths=False)
        assert [issue.key for issue in info.value.issues] == [key]
