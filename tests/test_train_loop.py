"""End-to-end training on tiny generated models: it learns, it saves what it trained, it resumes exactly, and
every training option of the issue runs through the real loop."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kohya_backend.assets.checkpoints import write_checkpoint
from kohya_backend.assets.dataset import write_demo_dataset
from kohya_backend.assets.tokenizer import write_tiny_tokenizer
from kohya_backend.config.validate import validate_config
from kohya_backend.data.images import load_image
from kohya_backend.errors import TrainingError
from kohya_backend.lora.network import LoRANetwork
from kohya_backend.lora.save import load_lora
from kohya_backend.models.load import load_checkpoint
from kohya_backend.models.upcast import MODE_ENV, MemoryFacts
from kohya_backend.train.conditioning import get_family
from kohya_backend.train.events import EventLog, read_events
from kohya_backend.train.inputs import TEXT_CACHE_DIR, encode_latents
from kohya_backend.train.loop import Trainer, train
from kohya_backend.train.noise import make_noise_scheduler
from kohya_backend.train.precision import Precision
from kohya_backend.train.setup import auto_vae_batch_size
from kohya_backend.train.state import SCALER_FILE, latest_state


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    out = {"tokenizer": write_tiny_tokenizer(root / "tokenizer") and root / "tokenizer"}
    for fm in ("sd_1_5", "sd_xl"):
        out[fm] = write_checkpoint(root / f"{fm}.safetensors", fm, size="tiny", seed=0)
    out["data"] = write_demo_dataset(root / "data", count=6, size=(64, 64))
    return out


def make_config(assets: dict[str, Path], out: Path, fm: str = "sd_1_5", **overrides: object):
    values: dict[str, object] = {
        "pretrained_model_name_or_path": str(assets[fm]),
        "tokenizer_cache_dir": str(assets["tokenizer"]),
        "train_data_dir": str(assets["data"]),
        "output_dir": str(out),
        "output_name": "t",
        "caption_extension": ".txt",
        "resolution": "64,64",
        "train_batch_size": 2,
        "max_train_steps": 6,
        "network_dim": 4,
        "network_alpha": 4,
        "optimizer_type": "AdamW",
        "learning_rate": 1e-3,
        "unet_lr": 1e-3,
        "text_encoder_lr": 1e-4,
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "save_precision": "float",
        "seed": 7,
    }
    values.update(overrides)
    return validate_config(values, fm)


def run(config, events: Path | None = None, stop: threading.Event | None = None):
    trainer = Trainer(config, events=EventLog(events, console=None), stop=stop)
    return trainer, trainer.run()


def eval_loss(fm: str, assets: dict[str, Path], lora: Path | None) -> float:
    """Mean loss over the dataset with fixed noise and timesteps, with or without a trained LoRA applied."""
    model = load_checkpoint(assets[fm], fm, tokenizer_dir=assets["tokenizer"])
    if lora is not None:
        sd, _ = load_lora(lora)
        net = LoRANetwork(
            family=fm, unet=model.unet, text_encoders=model.text_encoders, network_dim=4, network_alpha=4
        )
        net.load_kohya_state_dict(sd)
        net.apply_to()
    images = sorted((assets["data"] / "10_demo").glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    pixels = torch.stack(
        [
            torch.from_numpy(np.asarray(load_image(p), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            for p in images
        ]
    )
    gen = torch.Generator().manual_seed(0)
    scheduler = make_noise_scheduler()
    family = get_family(fm)
    losses = []
    with torch.no_grad():
        latents = encode_latents(model.vae, pixels, scale=model.arch.latent_scale, generator=gen)
        cond = family.encode(model.text_encoders, family.token_ids(model.tokenizers, captions, 75), 1)
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * len(images), dtype=torch.float32)
        for _ in range(4):
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (len(images),), generator=gen)
            pred = model.unet(
                scheduler.add_noise(latents, noise, t),
                t,
                encoder_hidden_states=cond.hidden,
                **family.unet_kwargs(cond, time_ids if fm == "sd_xl" else None),
            ).sample
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("fm", ["sd_1_5", "sd_xl"])
def test_training_lowers_the_loss_and_saves_what_it_trained(assets, tmp_path, fm):
    config = make_config(
        assets, tmp_path, fm, max_train_steps=60, unet_lr=1e-2, text_encoder_lr=1e-3, cache_latents=True
    )
    trainer, result = run(config, tmp_path / "events.jsonl")
    assert result.output == tmp_path / "t.safetensors" and result.step == 60
    before, after = eval_loss(fm, assets, None), eval_loss(fm, assets, result.output)
    assert after < before * 0.95, (before, after)
    # reloading the file reproduces the trained weights exactly (save_precision float)
    saved, meta = load_lora(result.output)
    trained = trainer.s.network.kohya_state_dict()
    assert saved.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(saved[key], value.cpu().float(), rtol=0, atol=0)
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if fm == "sd_xl" else "sd_v1")
    assert meta["ss_steps"] == "60" and meta["ss_output_name"] == "t"
    kinds = [e["kind"] for e in read_events(tmp_path / "events.jsonl")]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 60 and "saved" in kinds


def test_trained_lora_loads_in_diffusers_and_changes_the_output(assets, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    config = make_config(assets, tmp_path, max_train_steps=8, unet_lr=1e-2, text_encoder_lr=1e-3)
    trainer, result = run(config)
    model = load_checkpoint(assets["sd_1_5"], "sd_1_5", tokenizer_dir=assets["tokenizer"])
    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoders[0],
        tokenizer=model.tokenizers[0],
        unet=model.unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

    def image() -> torch.Tensor:
        out = pipe(
            "demo, red circle",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
        return out.images

    base = image()
    pipe.load_lora_weights(str(result.output))
    adapted = sum(isinstance(m, LoraLayer) for m in pipe.unet.modules())
    adapted_te = sum(isinstance(m, LoraLayer) for m in pipe.text_encoder.modules())
    assert adapted == len(trainer.s.network.unet_loras) and adapted_te == len(
        trainer.s.network.text_encoder_loras
    )
    with safe_open(str(result.output), "pt") as f:
        assert len(list(f.keys())) == 3 * (adapted + adapted_te)  # every down/up/alpha triple was consumed
    assert not torch.allclose(base, image())


def test_resume_continues_exactly(assets, tmp_path):
    common = dict(
        max_train_steps=10,
        save_every_n_steps=4,
        save_state=True,
        cache_latents=True,
        flip_aug=True,
        shuffle_caption=True,
        network_dropout=0.1,
    )
    _, full = run(make_config(assets, tmp_path / "a", **common))
    stop = threading.Event()
    events = tmp_path / "b.jsonl"
    log = EventLog(events, console=None)
    log.subscribe(lambda e: stop.set() if e.get("kind") == "state_saved" else None)
    stopped = Trainer(make_config(assets, tmp_path / "b", **common), events=log, stop=stop).run()
    assert stopped.stopped and stopped.output is None and stopped.step == 4
    state_dir = tmp_path / "b" / "t-state"
    resumed_cfg = make_config(assets, tmp_path / "b", resume=str(state_dir), **common)
    _, resumed = run(resumed_cfg)
    assert resumed.step == full.step == 10
    assert resumed.losses == full.losses[4:]  # same subsequent losses, bit for bit
    a, _ = load_lora(full.output)
    b, _ = load_lora(resumed.output)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_same_seed_same_run(assets, tmp_path):
    _, one = run(make_config(assets, tmp_path / "1", max_train_steps=4))
    _, two = run(make_config(assets, tmp_path / "2", max_train_steps=4))
    assert one.losses == two.losses


OPTIONS = {
    "v_pred_min_snr_offset": dict(v_parameterization=True, min_snr_gamma=5, noise_offset=0.05),
    "clip_skip_long_tokens": dict(clip_skip=2, max_token_length=225, shuffle_caption=True, keep_tokens=1),
    "grad_accum_clip": dict(gradient_accumulation_steps=2, max_grad_norm=0.5, train_batch_size=1),
    "unet_only_cached_te": dict(
        network_train_unet_only=True, cache_text_encoder_outputs=True, cache_latents=True
    ),
    "te_only": dict(network_train_text_encoder_only=True),
    "disk_latents_flip_ckpt": dict(
        cache_latents=True, cache_latents_to_disk=True, flip_aug=True, gradient_checkpointing=True
    ),
    "locon_lion_cosine": dict(
        network_args=["conv_dim=4", "conv_alpha=2"],
        optimizer_type="Lion",
        learning_rate=1e-4,
        lr_scheduler="cosine_with_restarts",
        lr_warmup_steps=2,
        lr_scheduler_num_cycles=2,
    ),
    "prodigy": dict(optimizer_type="Prodigy", learning_rate=1.0, unet_lr=1.0, text_encoder_lr=1.0),
    "adafactor": dict(
        optimizer_type="Adafactor",
        lr_scheduler="adafactor",
        optimizer_args=["relative_step=True", "scale_parameter=True", "warmup_init=True"],
    ),
    "sgd_polynomial_buckets": dict(
        optimizer_type="SGDNesterov",
        lr_scheduler="polynomial",
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=128,
        bucket_reso_steps=64,
    ),
    "adamw8bit_bf16": dict(optimizer_type="AdamW8bit", mixed_precision="bf16"),
    "epochs_samples": dict(
        max_train_epochs=2,
        train_batch_size=6,
        save_every_n_epochs=1,
        save_last_n_epochs=1,
        sample_every_n_epochs=1,
        sample_prompts="demo, red circle --w 64 --h 64 --s 2 --d 1",
        sample_sampler="euler_a",
    ),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_training_options_run(assets, tmp_path, name):
    fm = "sd_xl" if name in ("grad_accum_clip", "unet_only_cached_te") else "sd_1_5"
    options = dict(OPTIONS[name])
    if "sample_prompts" in options:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text(str(options["sample_prompts"]) + "\n")
        options["sample_prompts"] = str(prompts)
    config = make_config(assets, tmp_path, fm, max_train_steps=4, **options)
    _, result = run(config, tmp_path / "ev.jsonl")
    assert result.output is not None and result.output.exists()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    events = read_events(tmp_path / "ev.jsonl")
    if name == "epochs_samples":
        assert result.epoch == 2
        samples = [e for e in events if e["kind"] == "sample"]
        assert len(samples) == 2 and all(Path(e["path"]).exists() for e in samples)
        # save_last_n_epochs=1 keeps only the newest intermediate file (epoch 1 is replaced by the final one)
        assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
            "t-000001.safetensors",
            "t.safetensors",
        ]
    if name == "disk_latents_flip_ckpt":
        assert list((assets["data"] / "10_demo" / ".latent_cache").glob("*.safetensors"))
    if name == "te_only":
        saved, _ = load_lora(result.output)
        assert saved and all(k.startswith("lora_te") for k in saved)
    if name == "unet_only_cached_te":
        saved, _ = load_lora(result.output)
        assert saved and all(k.startswith("lora_unet") for k in saved)


def test_loss_scaling_trains_like_full_precision_and_resume_restores_the_scale(assets, tmp_path):
    """fp16's loss scaler, injected on the CPU: the optimizer must see unscaled gradients (SGD without clipping
    would otherwise move the weights 4096 times as far), and save_state/resume must carry the loss scale."""
    options = dict(optimizer_type="SGDNesterov", max_grad_norm=0, max_train_steps=3, save_state=True)
    _, plain = run(make_config(assets, tmp_path / "plain", **options))
    scaled = Precision(torch.device("cpu"), scaler=torch.amp.GradScaler("cpu", init_scale=4096.0))
    trainer = Trainer(
        make_config(assets, tmp_path / "scaled", **options),
        events=EventLog(None, console=None),
        precision=scaled,
    )
    result = trainer.run()
    assert plain.output is not None and result.output is not None
    want, _ = load_lora(plain.output)
    got, _ = load_lora(result.output)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7)
    state = latest_state(tmp_path / "scaled" / "t-state")
    assert state is not None and (state / SCALER_FILE).is_file()
    resumed = Precision(torch.device("cpu"), scaler=torch.amp.GradScaler("cpu", init_scale=2.0))
    again = make_config(
        assets, tmp_path / "scaled", **{**options, "max_train_steps": 4, "resume": str(state)}
    )
    Trainer(again, events=EventLog(None, console=None), precision=resumed).run()
    assert resumed.scaler is not None and resumed.scaler.get_scale() == 4096.0


def test_nan_loss_stops_with_an_actionable_error(assets, tmp_path):
    config = make_config(
        assets,
        tmp_path,
        learning_rate=1e30,
        unet_lr=1e30,
        text_encoder_lr=1e30,
        optimizer_type="SGDNesterov",
        max_train_steps=6,
    )
    with pytest.raises(TrainingError, match="loss became") as info:
        train(config, events=EventLog(None, console=None))
    assert "learning rate" in (info.value.hint or "")
    assert not (tmp_path / "t.safetensors").exists()


def test_each_caption_is_tokenised_once_per_run(assets, tmp_path, monkeypatch):
    import kohya_backend.train.conditioning as families

    seen: list[str] = []
    real = families.chunked_token_ids

    def counting(tokenizer, captions, max_token_length):
        seen.extend(captions)
        return real(tokenizer, captions, max_token_length)

    monkeypatch.setattr(families, "chunked_token_ids", counting)
    _, result = run(
        make_config(assets, tmp_path, max_train_steps=9)
    )  # 18 samples drawn from 6 captions, TE trained
    assert result.step == 9
    captions = {p.read_text().strip() for p in (assets["data"] / "10_demo").glob("*.txt")}
    assert sorted(seen) == sorted(captions)  # one tokenizer (SD 1.5), each caption once


def test_text_encoder_outputs_cached_to_disk_are_reused_by_the_next_run(assets, tmp_path):
    data = tmp_path / "data"
    write_demo_dataset(data, count=3, size=(64, 64))
    options = dict(
        train_data_dir=str(data),
        network_train_unet_only=True,
        cache_text_encoder_outputs=True,
        cache_text_encoder_outputs_to_disk=True,
        max_train_steps=2,
    )

    def text_caching(out: str, **extra: object) -> dict:
        run(make_config(assets, tmp_path / out, **{**options, **extra}), tmp_path / f"{out}.jsonl")
        [event] = [e for e in read_events(tmp_path / f"{out}.jsonl") if e.get("what") == "text"]
        return event

    first = text_caching("one")
    assert first["total"] == 3 and first["from_disk"] == 0
    assert len(list((data / TEXT_CACHE_DIR).glob("*.safetensors"))) == 3
    assert text_caching("two")["from_disk"] == 3  # the encoders did not run again
    assert text_caching("three", clip_skip=2)["from_disk"] == 0  # other settings: encoded anew
    assert text_caching("four", cache_text_encoder_outputs_to_disk=False)["from_disk"] == 0


def test_the_text_memo_holds_only_captions_that_can_come_back(assets, tmp_path):
    trainer, _ = run(make_config(assets, tmp_path / "fixed", network_train_unet_only=True, max_train_steps=6))
    assert trainer.s.text.cache is not None and 0 < len(trainer.s.text.cache) <= 6  # at most the 6 captions
    trainer, _ = run(
        make_config(
            assets,
            tmp_path / "shuffled",
            network_train_unet_only=True,
            shuffle_caption=True,
            max_train_steps=6,
        )
    )
    assert (
        trainer.s.text.cache is None and trainer.s.text.ids == {}
    )  # every shuffle is a new caption: nothing kept


def test_logging_dir_writes_tensorboard_events_like_kohya(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("demo, red circle --w 64 --h 64 --s 2 --d 1\n")
    config = make_config(
        assets,
        tmp_path / "out",
        logging_dir=str(tmp_path / "logs"),
        log_prefix="demo-",
        log_tracker_name="tracker",
        max_train_epochs=2,
        train_batch_size=6,
        sample_prompts=str(prompts),
        sample_every_n_epochs=1,
    )
    run(config)
    [run_dir] = (tmp_path / "logs").iterdir()
    assert run_dir.name.startswith("demo-") and run_dir.name[len("demo-") :].isdigit()
    accumulator = EventAccumulator(str(run_dir / "tracker"), size_guidance={"images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "loss/epoch_average"} <= set(
        tags["scalars"]
    )
    assert [e.step for e in accumulator.Scalars("loss/current")] == list(range(1, 21))  # 2 epochs of 10 steps
    assert [e.value for e in accumulator.Scalars("lr/unet")] == pytest.approx([1e-3] * 20)
    assert [e.value for e in accumulator.Scalars("lr/textencoder")] == pytest.approx([1e-4] * 20)
    assert [e.step for e in accumulator.Scalars("loss/epoch_average")] == [1, 2]
    assert tags["images"] == ["sample_0"] and [e.step for e in accumulator.Images("sample_0")] == [10, 20]


def test_cpu_latent_encoding_matches_the_plain_layout_and_returns_contiguous_latents(assets):
    model = load_checkpoint(assets["sd_1_5"], "sd_1_5", tokenizer_dir=assets["tokenizer"])
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        fast = encode_latents(model.vae, pixels, scale=0.5, generator=torch.Generator().manual_seed(3))
        plain = model.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(3)) * 0.5
    assert fast.is_contiguous()  # cached latents keep the UNet's plain layout
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_latent_caching_batch_is_one_image_on_the_cpu_and_area_scaled_on_a_gpu():
    assert auto_vae_batch_size((256, 256), "cpu") == 1
    assert auto_vae_batch_size((512, 512), "cuda") == 4
    assert auto_vae_batch_size((256, 256), "cuda") == 8
    assert auto_vae_batch_size((1024, 1024), torch.device("cuda")) == 1


def test_training_from_an_fp16_file_on_the_cpu_matches_fully_upcast_weights(assets, tmp_path, monkeypatch):
    import kohya_backend.train.setup as loop

    monkeypatch.setenv(MODE_ENV, "keep")  # kept to the end, never upcast after the first step
    half = write_checkpoint(tmp_path / "half.safetensors", "sd_xl", size="tiny", dtype=torch.float16, seed=0)
    fp16_assets = {**assets, "sd_xl": half}
    (tmp_path / "prompts.txt").write_text("a photo --w 64 --h 64 --s 2\n")
    sampling = {"sample_prompts": str(tmp_path / "prompts.txt"), "sample_every_n_steps": 3}
    kept_trainer, kept = run(
        make_config(fp16_assets, tmp_path / "kept", fm="sd_xl", max_train_steps=3, **sampling),
        events=tmp_path / "kept.jsonl",
    )
    assert any(p.dtype == torch.float16 for p in kept_trainer.s.model.unet.parameters())
    logs = [e["message"] for e in read_events(tmp_path / "kept.jsonl") if e["kind"] == "log"]
    assert any("fp16/bf16 Linear/Conv2d weights are kept as stored" in m and "float16" in m for m in logs), (
        logs
    )
    assert list((tmp_path / "kept" / "sample").glob("*.png"))  # the pipelines ran on the kept fp16 weights

    real = loop.load_checkpoint
    monkeypatch.setattr(
        loop, "load_checkpoint", lambda *a, **k: real(*a, **{**k, "keep_file_precision": False})
    )
    upcast_trainer, upcast = run(make_config(fp16_assets, tmp_path / "upcast", fm="sd_xl", max_train_steps=3))
    assert {p.dtype for p in upcast_trainer.s.model.unet.parameters()} == {torch.float32}
    assert kept_trainer.losses == pytest.approx(upcast_trainer.losses, rel=1e-5)
    kept_sd, _ = load_lora(kept.output)
    upcast_sd, _ = load_lora(upcast.output)
    for key, value in kept_sd.items():
        torch.testing.assert_close(value, upcast_sd[key], rtol=1e-4, atol=1e-6, msg=key)


def test_an_fp16_file_is_upcast_after_the_first_step_when_memory_allows_and_trains_the_same_lora(
    assets, tmp_path, monkeypatch
):
    """The first step runs on the kept fp16 weights; the "weights" event that follows it says whether they were
    upcast (plenty of memory here) or kept (a machine whose memory would not hold the copies); the LoRA is the
    same either way."""
    import kohya_backend.train.loop as loop

    half = write_checkpoint(tmp_path / "half.safetensors", "sd_1_5", size="tiny", dtype=torch.float16, seed=0)
    fp16_assets = {**assets, "sd_1_5": half}
    results = {}
    for name, available in (("upcast", None), ("kept", 1 << 20)):
        if available is not None:  # the copies plus the margin no longer fit
            tight = MemoryFacts(available, 1 << 34, 1 << 28, 1 << 28)
            monkeypatch.setattr(loop, "memory_facts", lambda facts=tight: facts)
        config = make_config(fp16_assets, tmp_path / name, max_train_steps=3)
        trainer, result = run(config, events=tmp_path / f"{name}.jsonl")
        events = read_events(tmp_path / f"{name}.jsonl")
        kinds = [(e["kind"], e.get("step")) for e in events if e["kind"] in ("step", "weights")]
        assert kinds == [("step", 1), ("weights", None), ("step", 2), ("step", 3)], kinds
        weights = next(e for e in events if e["kind"] == "weights")
        assert weights["choice"] == name and weights["message"].startswith(name), weights
        dtypes = {
            p.dtype for m in (trainer.s.model.unet, *trainer.s.model.text_encoders) for p in m.parameters()
        }
        assert dtypes == ({torch.float32} if name == "upcast" else {torch.float32, torch.float16}), name
        results[name] = (trainer.losses, load_lora(result.output)[0])
    assert results["upcast"][0] == results["kept"][0]
    upcast_sd, kept_sd = results["upcast"][1], results["kept"][1]
    assert upcast_sd.keys() == kept_sd.keys()
    for key, value in upcast_sd.items():
        assert torch.equal(value, kept_sd[key]), key

    # nothing to decide for an fp32 file, nor after a run's last step
    monkeypatch.undo()
    run(make_config(assets, tmp_path / "fp32", max_train_steps=2), events=tmp_path / "fp32.jsonl")
    assert not [e for e in read_events(tmp_path / "fp32.jsonl") if e["kind"] == "weights"]
    one_trainer, _ = run(
        make_config(fp16_assets, tmp_path / "one", max_train_steps=1), events=tmp_path / "1.jsonl"
    )
    assert not [e for e in read_events(tmp_path / "1.jsonl") if e["kind"] == "weights"]
    assert any(p.dtype == torch.float16 for p in one_trainer.s.model.unet.parameters())


def test_bf16_on_the_cpu_stores_frozen_weights_in_bf16_with_the_results_of_autocast(
    assets, tmp_path, monkeypatch
):
    """mixed_precision bf16 on the CPU: frozen Linear/Conv2d weights in bf16 (half the memory, no cast per call), the
    LoRA and optimizer in fp32, and the LoRA that autocast over fp32 weights trains."""
    import kohya_backend.train.setup as setup

    config = make_config(assets, tmp_path / "bf16", max_train_steps=3, mixed_precision="bf16")
    stored_trainer, stored = run(config, events=tmp_path / "bf16.jsonl")
    unet = stored_trainer.s.model.unet
    to_q = next(m for name, m in unet.named_modules() if name.endswith("attn1.to_q"))
    assert to_q.weight.dtype == torch.bfloat16 and unet.dtype == torch.float32
    assert {p.dtype for p in stored_trainer.s.network.parameters()} == {torch.float32}
    logs = [e["message"] for e in read_events(tmp_path / "bf16.jsonl") if e["kind"] == "log"]
    assert any("stored in bf16 for bf16 autocast" in m for m in logs), logs

    real = setup.load_checkpoint
    monkeypatch.setattr(setup, "load_checkpoint", lambda *a, **k: real(*a, **{**k, "compute_dtype": None}))
    config = make_config(assets, tmp_path / "fp32", max_train_steps=3, mixed_precision="bf16")
    today_trainer, today = run(config)
    assert {p.dtype for p in today_trainer.s.model.unet.parameters()} == {torch.float32}
    assert stored_trainer.losses == today_trainer.losses
    stored_sd, _ = load_lora(stored.output)
    today_sd, _ = load_lora(today.output)
    assert stored_sd.keys() == today_sd.keys()
    for key, value in stored_sd.items():
        assert torch.equal(value, today_sd[key]), key
