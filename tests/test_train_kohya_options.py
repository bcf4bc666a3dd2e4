"""The training options of kohya's presets through the real loop on the tiny demo model: each one changes what the
trainer does; max-norm, schedule-free and scheduler classes do what kohya's do; LyCORIS networks train, resume,
start from network_weights, and load in diffusers/peft with the same effect they had in training."""

# ruff: noqa: F811  (the `assets` fixture is imported from test_train_loop and taken as a parameter)
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from test_train_loop import assets, make_config, run  # noqa: F401 (the module-scoped fixture)

from kohya_backend.lora.lycoris import LycorisNetwork
from kohya_backend.lora.max_norm import lora_update
from kohya_backend.lora.save import load_lora
from kohya_backend.models.load import load_checkpoint
from kohya_backend.train.events import EventLog, read_events
from kohya_backend.train.loop import Trainer

STEPS = 3


def losses(assets, tmp_path: Path, name: str, **options: object) -> list[float]:
    _, result = run(make_config(assets, tmp_path / name, max_train_steps=STEPS, **options))
    assert result.step == STEPS and all(torch.isfinite(torch.tensor(result.losses)))
    return result.losses


# each option against the same run without it (or with the option it refines): a different trajectory shows the
# trainer read it; identical losses would mean it was accepted and ignored
PAIRS: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "multires_noise_iterations": ({"multires_noise_iterations": 6}, {}),
    "multires_noise_discount": (
        {"multires_noise_iterations": 6, "multires_noise_discount": 0.8},
        {"multires_noise_iterations": 6},
    ),
    "noise_offset_random_strength": (
        {"noise_offset": 0.1, "noise_offset_random_strength": True},
        {"noise_offset": 0.1},
    ),
    "adaptive_noise_scale": ({"noise_offset": 0.1, "adaptive_noise_scale": 0.5}, {"noise_offset": 0.1}),
    "ip_noise_gamma": ({"ip_noise_gamma": 0.1}, {}),
    "ip_noise_gamma_random_strength": (
        {"ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True},
        {"ip_noise_gamma": 0.1},
    ),
    "zero_terminal_snr": (
        {"zero_terminal_snr": True, "v_parameterization": True},
        {"v_parameterization": True},
    ),
    "loss_type": ({"loss_type": "huber"}, {}),
    "loss_type_smooth_l1": ({"loss_type": "smooth_l1"}, {"loss_type": "huber"}),
    "loss_type_l1": ({"loss_type": "l1"}, {}),
    "huber_schedule": ({"loss_type": "huber", "huber_schedule": "exponential"}, {"loss_type": "huber"}),
    "huber_c": ({"loss_type": "huber", "huber_c": 0.5}, {"loss_type": "huber"}),
    "huber_scale": (
        {"loss_type": "huber", "huber_schedule": "constant", "huber_scale": 3.0},
        {"loss_type": "huber", "huber_schedule": "constant"},
    ),
    "debiased_estimation_loss": ({"debiased_estimation_loss": True}, {}),
    "v_pred_like_loss": ({"v_pred_like_loss": 0.5}, {}),
    "scale_v_pred_loss_like_noise_pred": (
        {"v_parameterization": True, "scale_v_pred_loss_like_noise_pred": True},
        {"v_parameterization": True},
    ),
}


@pytest.fixture(scope="module")
def trajectories(assets, tmp_path_factory):
    """Losses per option set, each run once for the module (the same baselines serve several keys)."""
    seen: dict[str, list[float]] = {}

    def get(options: dict[str, object]) -> list[float]:
        name = repr(sorted(options.items()))
        if name not in seen:
            seen[name] = losses(assets, tmp_path_factory.mktemp("run"), "out", **options)
        return seen[name]

    return get


@pytest.mark.parametrize("key", list(PAIRS))
def test_each_noise_and_loss_option_changes_training(trajectories, key):
    with_it, without = PAIRS[key]
    assert trajectories(with_it) != trajectories(without)


def test_scale_weight_norms_caps_every_saved_update_and_logs_kohyas_numbers(assets, tmp_path):
    config = make_config(
        assets, tmp_path, max_train_steps=STEPS, unet_lr=5e-2, text_encoder_lr=5e-2, scale_weight_norms=0.02
    )
    _, result = run(config, tmp_path / "events.jsonl")
    steps = [e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "step"]
    assert all(
        {"max_norm/keys_scaled", "norm/avg_key_norm", "max_norm/max_key_norm"} <= set(e) for e in steps
    )
    assert steps[-1]["max_norm/keys_scaled"] > 0 and steps[-1]["max_norm/max_key_norm"] <= 0.02 + 1e-6
    saved, _ = load_lora(result.output)
    modules = {k.split(".")[0] for k in saved}
    norms = [
        float(
            lora_update(
                saved[f"{m}.lora_down.weight"], saved[f"{m}.lora_up.weight"], float(saved[f"{m}.alpha"])
            ).norm()
        )
        for m in modules
    ]
    assert max(norms) <= 0.02 * (1 + 1e-4)
    unscaled = run(
        make_config(assets, tmp_path / "free", max_train_steps=STEPS, unet_lr=5e-2, text_encoder_lr=5e-2)
    )[1]
    free, _ = load_lora(unscaled.output)
    free_norms = [
        float(
            lora_update(
                free[f"{m}.lora_down.weight"], free[f"{m}.lora_up.weight"], float(free[f"{m}.alpha"])
            ).norm()
        )
        for m in modules
    ]
    assert max(free_norms) > 0.02  # without the cap the same run goes above it


def test_lr_scheduler_type_drives_the_learning_rate(assets, tmp_path):
    config = make_config(
        assets,
        tmp_path,
        max_train_steps=4,
        lr_scheduler_type="CosineAnnealingLR",
        lr_scheduler_args=["T_max=4"],
        learning_rate=1e-3,
        unet_lr=1e-3,
        text_encoder_lr=1e-3,
    )
    run(config, tmp_path / "events.jsonl")
    lrs = [e["lrs"][0] for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "step"]
    assert lrs == pytest.approx(
        [1e-3 * (1 + torch.cos(torch.tensor(torch.pi * t / 4)).item()) / 2 for t in (1, 2, 3, 4)]
    )


def test_lr_scheduler_args_reach_a_named_schedule(assets, tmp_path):
    common = dict(
        max_train_steps=4, lr_scheduler="polynomial", learning_rate=1e-3, unet_lr=1e-3, text_encoder_lr=1e-3
    )
    run(make_config(assets, tmp_path / "a", **common), tmp_path / "a.jsonl")
    run(
        make_config(assets, tmp_path / "b", lr_scheduler_args=["lr_end=5e-4"], **common), tmp_path / "b.jsonl"
    )
    plain = [e["lrs"][0] for e in read_events(tmp_path / "a.jsonl") if e["kind"] == "step"]
    ended = [e["lrs"][0] for e in read_events(tmp_path / "b.jsonl") if e["kind"] == "step"]
    assert plain[-1] == pytest.approx(1e-7) and ended[-1] == pytest.approx(5e-4)


def test_schedule_free_saves_its_averaged_weights(assets, tmp_path):
    config = make_config(assets, tmp_path, max_train_steps=STEPS, optimizer_type="AdamWScheduleFree")
    trainer, result = run(config)
    saved, _ = load_lora(result.output)
    assert trainer.s.optimizer.param_groups[0]["train_mode"] is False  # saved in eval mode, as kohya
    for key, value in trainer.s.network.kohya_state_dict().items():
        torch.testing.assert_close(saved[key], value.cpu(), rtol=0, atol=0)
    trainer.s.optimizer.train()  # the weights it steps with are different
    moved = trainer.s.network.kohya_state_dict()
    assert any(not torch.equal(saved[k], v.cpu()) for k, v in moved.items() if k.endswith("weight"))


@pytest.mark.parametrize(
    ("optimizer", "built"),
    [
        ("pytorch_optimizer.CAME", "pytorch_optimizer.optimizer.came.CAME"),
        ("DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam"),
        pytest.param(
            "PagedAdamW8bit",
            "bitsandbytes.optim.adamw.PagedAdamW8bit",
            marks=pytest.mark.skipif(sys.platform == "darwin", reason="no bitsandbytes on macOS"),
        ),
    ],
)
def test_optimizers_of_the_presets_train(assets, tmp_path, optimizer, built):
    lr = 1.0 if optimizer.startswith("DAdapt") else 1e-3
    config = make_config(
        assets,
        tmp_path,
        max_train_steps=STEPS,
        optimizer_type=optimizer,
        learning_rate=lr,
        unet_lr=lr,
        text_encoder_lr=lr,
    )
    trainer, result = run(config)
    assert result.step == STEPS and all(torch.isfinite(torch.tensor(result.losses)))
    # the class the preset names, not a stand-in that happens to train too
    assert f"{type(trainer.s.optimizer).__module__}.{type(trainer.s.optimizer).__name__}" == built


# ------------------------------------------------------------------------------------------------ LyCORIS
def lycoris(algo: str, preset: str = "full", **extra: object) -> dict[str, object]:
    args = [f"algo={algo}", f"preset={preset}", "conv_dim=4", "conv_alpha=4", *extra.pop("args", [])]  # type: ignore[misc]
    return {"network_module": "lycoris.kohya", "network_args": args, **extra}


def _pipeline(assets):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

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
    return model, pipe


def _image(pipe) -> torch.Tensor:
    out = pipe(
        "demo, red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


def _module_paths(model) -> dict[str, tuple[torch.nn.Module, str]]:
    """kohya module name -> (root model, module path inside it) for the pipeline's UNet and text encoder."""
    paths: dict[str, tuple[torch.nn.Module, str]] = {}
    for name, _ in model.unet.named_modules():
        paths["lora_unet_" + name.replace(".", "_")] = (model.unet, name)
    te = model.text_encoders[0]
    for name, _ in te.named_modules():
        paths["lora_te_text_model_" + name.replace(".", "_")] = (te, name)
    return paths


def _by_root(sd: dict[str, torch.Tensor], model) -> dict[int, dict[str, torch.Tensor]]:
    paths = _module_paths(model)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        module, part = key.split(".", 1)
        root, path = paths[module]
        out.setdefault(id(root), {})[f"{path}.{part}"] = value
    return out


def _load_lokr_in_diffusers(pipe, model, sd):
    """The UNet through diffusers' own LoKr support (load_lora_adapter, which builds peft's LoKrConfig and bakes
    LyCORIS's alpha); the text encoder, which diffusers loads only as LoRA, through peft with diffusers' config."""
    from diffusers.loaders.lora_conversion_utils import _bake_lokr_alpha_
    from diffusers.utils.peft_utils import _create_lokr_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    parts = _by_root(sd, model)
    unet_sd = parts[id(model.unet)]
    _bake_lokr_alpha_(unet_sd)
    pipe.unet.load_lora_adapter(unet_sd, prefix=None, adapter_name="lokr")
    te = model.text_encoders[0]
    te_sd = parts[id(te)]
    _bake_lokr_alpha_(te_sd)
    inject_adapter_in_model(_create_lokr_config(te_sd, None), te, adapter_name="lokr")
    result = set_peft_model_state_dict(te, te_sd, adapter_name="lokr")
    assert not [k for k in result.unexpected_keys if "lokr" in k]
    return sum("lokr" in n for n, _ in pipe.unet.named_parameters()) + sum(
        "lokr" in n for n, _ in te.named_parameters()
    )


def _load_loha_in_peft(model, sd, alpha: float, rank: int):
    """diffusers has no LoHa loader: peft's LoHa (LyCORIS's hada_* parameters, scale alpha/r) on each model."""
    from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict

    count = 0
    for root_id, part in _by_root(sd, model).items():
        root = model.unet if id(model.unet) == root_id else model.text_encoders[0]
        weights = {
            k: v.reshape(v.shape[0], -1) if "hada" in k else v
            for k, v in part.items()
            if not k.endswith(".alpha")
        }
        targets = sorted({k.rsplit(".", 1)[0] for k in weights})
        config = LoHaConfig(r=rank, alpha=alpha, target_modules=targets, use_effective_conv2d=False)
        inject_adapter_in_model(config, root, adapter_name="loha")
        result = set_peft_model_state_dict(root, weights, adapter_name="loha")
        assert not [k for k in result.unexpected_keys if "hada" in k]
        count += len(weights)
    return count


# diffusers 0.42 builds LoKr adapters for Linear layers only, so the LoKr here uses the attn-only preset (SD 1.5 has
# 1x1 convs in its transformer blocks);
# LoKr on convolutions is proven against the WebUIs' key logic in test_lora_lycoris.py
@pytest.mark.parametrize(("algo", "preset"), [("loha", "full"), ("lokr", "attn-only")])
def test_lycoris_trained_on_the_demo_model_loads_in_diffusers_and_changes_its_output(
    assets, tmp_path, algo, preset
):
    options = lycoris(algo, preset, network_dim=4, network_alpha=4)
    trainer, result = run(
        make_config(assets, tmp_path, max_train_steps=6, unet_lr=1e-2, text_encoder_lr=1e-2, **options)
    )
    saved, meta = load_lora(result.output)
    assert isinstance(trainer.s.network, LycorisNetwork)
    assert saved.keys() == trainer.s.network.kohya_state_dict().keys()
    assert meta["ss_network_module"] == "lycoris.kohya" and f'"algo": "{algo}"' in meta["ss_network_args"]
    suffix = "hada_w1_a" if algo == "loha" else "lokr_w1"
    assert any(k.endswith(suffix) for k in saved) and any(k.startswith("lora_te_") for k in saved)

    model, pipe = _pipeline(assets)
    base = _image(pipe)
    loaded = (
        _load_lokr_in_diffusers(pipe, model, saved)
        if algo == "lokr"
        else _load_loha_in_peft(model, saved, 4.0, 4)
    )
    assert loaded >= len(saved) // 3
    adapted = _image(pipe)
    assert not torch.allclose(base, adapted, atol=1e-3)
    # the same file through our own network gives the same image: diffusers/peft apply what was trained
    ours_model, ours_pipe = _pipeline(assets)
    net = LycorisNetwork(
        family="sd_1_5",
        unet=ours_model.unet,
        text_encoders=ours_model.text_encoders,
        network_dim=4,
        network_alpha=4,
        network_args=dict(a.split("=", 1) for a in options["network_args"]),  # type: ignore[union-attr]
    )
    net.load_kohya_state_dict(saved)
    net.apply_to()
    net.eval()
    torch.testing.assert_close(_image(ours_pipe), adapted, rtol=1e-3, atol=2e-3)


def test_lycoris_resumes_exactly(assets, tmp_path):
    common = dict(
        max_train_steps=6, save_every_n_steps=3, save_state=True, **lycoris("lokr", args=["factor=4"])
    )
    _, full = run(make_config(assets, tmp_path / "a", **common))
    stop = threading.Event()
    log = EventLog(tmp_path / "b.jsonl", console=None)
    log.subscribe(lambda e: stop.set() if e.get("kind") == "state_saved" else None)
    stopped = Trainer(make_config(assets, tmp_path / "b", **common), events=log, stop=stop).run()
    assert stopped.stopped and stopped.step == 3
    _, resumed = run(make_config(assets, tmp_path / "b", resume=str(tmp_path / "b" / "t-state"), **common))
    assert resumed.losses == full.losses[3:]
    a, _ = load_lora(full.output)
    b, _ = load_lora(resumed.output)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_lycoris_starts_from_network_weights(assets, tmp_path):
    _, first = run(make_config(assets, tmp_path / "a", max_train_steps=3, unet_lr=1e-2, **lycoris("loha")))
    start, _ = load_lora(first.output)
    tiny = dict(learning_rate=1e-9, unet_lr=1e-9, text_encoder_lr=1e-9, optimizer_type="SGDNesterov")
    _, second = run(
        make_config(
            assets,
            tmp_path / "b",
            max_train_steps=1,
            network_weights=str(first.output),
            **tiny,
            **lycoris("loha"),
        )
    )
    continued, _ = load_lora(second.output)
    for key, value in start.items():
        torch.testing.assert_close(continued[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    ("fm", "algo", "suffix"),
    [
        ("sd_1_5", "locon", "lora_up.weight"),
        ("sd_1_5", "ia3", "on_input"),
        ("sd_1_5", "dylora", "lora_down.weight"),
        ("sd_1_5", "glora", "b2.weight"),
        ("sd_1_5", "diag-oft", "oft_blocks"),
        ("sd_1_5", "full", "diff"),
        ("sd_xl", "loha", "hada_w2_b"),
    ],
)
def test_every_lycoris_algorithm_trains_and_saves(assets, tmp_path, fm, algo, suffix):
    args = ["constraint=0.001"] if algo == "diag-oft" else []
    config = make_config(
        assets, tmp_path, fm, max_train_steps=2, save_precision="fp16", **lycoris(algo, args=args)
    )
    trainer, result = run(config)
    saved, meta = load_lora(result.output)
    assert saved.keys() == trainer.s.network.kohya_state_dict().keys()
    assert any(k.endswith(suffix) for k in saved) and {v.dtype for v in saved.values()} == {torch.float16}
    # every parameter of the network is one the optimizer steps (none left at its initial value unseen)
    stepped = {id(p) for group in trainer.s.optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in trainer.s.network.parameters()}
    if fm == "sd_xl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in saved) and any(
            k.startswith("lora_te2_") for k in saved
        )
    assert meta["ss_network_module"] == "lycoris.kohya"
