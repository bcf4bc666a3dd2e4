"""LoRA network on tiny SD 1.5 / SDXL models: targets and names, forward math, apply/remove, groups, loading."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kohya_backend.errors import ConfigError, ModelError
from kohya_backend.lora.network import LoRAModule, LoRANetwork, lora_targets
from kohya_backend.models.arch import sd15_architecture, sdxl_architecture

# modules kohya targets in one transformer block: attn1/attn2 q, k, v, out; ff in and out
PER_TRANSFORMER_BLOCK = 10
PER_CLIP_LAYER = 6


@pytest.fixture(scope="module")
def sd15():
    torch.manual_seed(0)
    arch = sd15_architecture("tiny")
    return arch, arch.build_unet().eval(), [te.eval() for te in arch.build_text_encoders()]


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(0)
    arch = sdxl_architecture("tiny")
    return arch, arch.build_unet().eval(), [te.eval() for te in arch.build_text_encoders()]


def make_network(model, **kwargs) -> LoRANetwork:
    arch, unet, tes = model
    options = {"network_dim": 4, "network_alpha": 2.0, "unet_layers_per_block": arch.layers_per_block}
    options.update(kwargs)
    return LoRANetwork(family=arch.family, unet=unet, text_encoders=tes, **options)


def randomize_up(network: LoRANetwork, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.3)


def unet_out(model) -> torch.Tensor:
    arch, unet, _ = model
    gen = torch.Generator().manual_seed(5)
    ctx_dim = arch.unet["cross_attention_dim"]
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 7, ctx_dim, generator=gen)
    kwargs = {}
    if arch.family == "sd_xl":
        pooled = arch.unet["projection_class_embeddings_input_dim"] - 6 * arch.unet["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=gen),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=ctx, **kwargs).sample


def te_out(model, index: int = 0) -> torch.Tensor:
    _, _, tes = model
    ids = torch.tensor([[0, 5, 17, 300, 2, 2, 2]])
    with torch.no_grad():
        return tes[index](ids).last_hidden_state


def test_sd15_targets_names_and_counts(sd15):
    arch, unet, tes = sd15
    targets = lora_targets(family="sd_1_5", unet=unet, text_encoders=tes, conv=False)
    names = [name for name, _ in targets]
    n_transformers = sum(type(m).__name__ == "Transformer2DModel" for m in unet.modules())
    n_layers = arch.text_encoders[0]["num_hidden_layers"]
    unet_names = [n for n in names if n.startswith("lora_unet_")]
    te_names = [n for n in names if n.startswith("lora_te_")]
    assert len(unet_names) == n_transformers * (PER_TRANSFORMER_BLOCK + 2)  # + proj_in/proj_out
    assert len(te_names) == n_layers * PER_CLIP_LAYER
    assert len(names) == len(set(names)) == len(unet_names) + len(te_names)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_names
    assert "lora_te_text_model_encoder_layers_2_mlp_fc2" in te_names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_names
    assert "lora_unet_mid_block_attentions_0_proj_in" in unet_names
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2" in unet_names
    assert not any("resnets" in n or "samplers" in n for n in names)
    by_name = dict(targets)
    assert by_name["lora_te_text_model_encoder_layers_1_mlp_fc1"] is tes[0].encoder.layers[1].mlp.fc1
    proj_in = by_name["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert isinstance(proj_in, nn.Conv2d) and proj_in.kernel_size == (1, 1)


def test_sdxl_targets_use_sai_names_and_te1_te2(sdxl):
    _, unet, tes = sdxl
    names = [name for name, _ in lora_targets(family="sd_xl", unet=unet, text_encoders=tes, conv=False)]
    te1 = [n for n in names if n.startswith("lora_te1_text_model_encoder_layers_")]
    te2 = [n for n in names if n.startswith("lora_te2_text_model_encoder_layers_")]
    assert len(te1) == len(te2) == 3 * PER_CLIP_LAYER
    assert not any("text_projection" in n for n in names)
    unet_names = [n for n in names if n.startswith("lora_unet_")]
    assert len(names) == len(te1) + len(te2) + len(unet_names)
    # tiny SDXL: transformer depth 2 in the second down block (2 layers), mid and 3 up attentions
    assert {n.split("_transformer_blocks")[0].split("_proj_")[0] for n in unet_names} == {
        "lora_unet_input_blocks_4_1",
        "lora_unet_input_blocks_5_1",
        "lora_unet_middle_block_1",
        "lora_unet_output_blocks_0_1",
        "lora_unet_output_blocks_1_1",
        "lora_unet_output_blocks_2_1",
    }
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in unet_names
    assert "lora_unet_middle_block_1_proj_out" in unet_names
    assert len(unet_names) == 6 * (2 * PER_TRANSFORMER_BLOCK + 2)


def test_locon_adds_resnet_and_sampler_layers(sd15, sdxl):
    for model, down_conv in (
        (sd15, "lora_unet_down_blocks_0_downsamplers_0_conv"),
        (sdxl, "lora_unet_input_blocks_3_0_op"),
    ):
        network = make_network(model, conv_dim=3, conv_alpha=1.5)
        sd = network.kohya_state_dict()
        plain = make_network(model).kohya_state_dict()
        added = sorted({k.split(".")[0] for k in sd} - {k.split(".")[0] for k in plain})
        assert down_conv in added
        org = dict(lora_targets(family=model[0].family, unet=model[1], text_encoders=[], conv=True))[
            down_conv
        ]
        assert tuple(sd[f"{down_conv}.lora_down.weight"].shape) == (3, org.in_channels, 3, 3)
        assert tuple(sd[f"{down_conv}.lora_up.weight"].shape) == (org.out_channels, 3, 1, 1)
        assert float(sd[f"{down_conv}.alpha"]) == 1.5
        # sd-scripts also wraps the resnets' Linear (time embedding) at network_dim
        linear = next(n for n in added if n.endswith(("time_emb_proj", "emb_layers_1")))
        assert sd[f"{linear}.lora_down.weight"].shape[0] == 4
        assert float(sd[f"{linear}.alpha"]) == 2.0
    sdxl_added = {k.split(".")[0] for k in make_network(sdxl, conv_dim=3).kohya_state_dict()}
    assert "lora_unet_input_blocks_1_0_in_layers_2" in sdxl_added
    assert "lora_unet_output_blocks_2_2_conv" in sdxl_added  # upsampler after an attention: slot 2


def test_locon_default_conv_alpha_is_one(sd15):
    network = make_network(sd15, conv_dim=2)
    assert float(network.kohya_state_dict()["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.0


def test_zero_up_keeps_output_and_nonzero_changes_it(sd15):
    base_unet, base_te = unet_out(sd15), te_out(sd15)
    network = make_network(sd15, conv_dim=2)
    network.apply_to()
    try:
        assert torch.equal(unet_out(sd15), base_unet)
        assert torch.equal(te_out(sd15), base_te)
        randomize_up(network)
        changed_unet, changed_te = unet_out(sd15), te_out(sd15)
        assert (changed_unet - base_unet).abs().max() > 1e-3
        assert (changed_te - base_te).abs().max() > 1e-3
        network.apply_to()  # idempotent: the update is still added once
        assert torch.equal(unet_out(sd15), changed_unet)
    finally:
        network.remove()
    assert torch.equal(unet_out(sd15), base_unet)
    assert torch.equal(te_out(sd15), base_te)
    network.remove()  # a second remove is harmless
    assert torch.equal(unet_out(sd15), base_unet)


def test_linear_lora_math_alpha_and_multiplier():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    base = layer(x).detach()
    lora = LoRAModule("lora_test", layer, dim=2, alpha=0.5, multiplier=0.7)
    assert tuple(lora.lora_down.weight.shape) == (2, 6) and tuple(lora.lora_up.weight.shape) == (5, 2)
    assert torch.count_nonzero(lora.lora_up.weight) == 0 and torch.count_nonzero(lora.lora_down.weight) > 0
    bound = 1 / math.sqrt(6)  # kaiming_uniform(a=sqrt(5)) on a fan-in of 6
    assert lora.lora_down.weight.abs().max() <= bound
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.apply_to()
    expected = base + (x @ lora.lora_down.weight.T @ lora.lora_up.weight.T) * 0.7 * 0.5 / 2
    torch.testing.assert_close(layer(x), expected)
    lora.remove()
    torch.testing.assert_close(layer(x), base)


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_missing_or_zero_alpha_means_dim(alpha):
    lora = LoRAModule("lora_test", nn.Linear(4, 4), dim=3, alpha=alpha)
    assert lora.scale == 1.0 and float(lora.alpha) == 3.0


def test_conv_lora_keeps_kernel_stride_padding():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    base = conv(x).detach()
    lora = LoRAModule("lora_conv", conv, dim=2, alpha=4.0)
    assert tuple(lora.lora_down.weight.shape) == (2, 3, 3, 3)
    assert tuple(lora.lora_up.weight.shape) == (5, 2, 1, 1)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.apply_to()
    down = torch.nn.functional.conv2d(x, lora.lora_down.weight, stride=2, padding=1)
    expected = base + torch.nn.functional.conv2d(down, lora.lora_up.weight) * 2.0
    torch.testing.assert_close(conv(x), expected)
    lora.remove()


def test_set_multiplier_scales_the_update(sd15):
    base = te_out(sd15)
    network = make_network(sd15, train_unet=False)
    randomize_up(network)
    network.apply_to()
    try:
        full = te_out(sd15) - base
        network.set_multiplier(0.0)
        assert torch.equal(te_out(sd15), base)
        network.set_multiplier(1.0)
        torch.testing.assert_close(te_out(sd15) - base, full)
    finally:
        network.remove()


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    lora = LoRAModule("lora_d", layer, dim=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.apply_to()
    x = torch.randn(16, 8)
    lora.eval()
    assert torch.equal(layer(x), layer(x))
    lora.train()
    assert not torch.equal(layer(x), layer(x))


def test_fp16_layer_with_fp32_lora(sd15):
    layer = nn.Linear(4, 3).to(torch.float16)
    lora = LoRAModule("lora_h", layer, dim=2, alpha=2)
    assert lora.lora_down.weight.dtype == torch.float32
    with torch.no_grad():
        lora.lora_up.weight.fill_(0.1)
    lora.apply_to()
    out = layer(torch.ones(1, 4, dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_param_groups_and_training_flags(sd15):
    network = make_network(sd15)
    groups = network.param_groups(unet_lr=1e-4, text_encoder_lr=1e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("text_encoder", 1e-5), ("unet", 1e-4)]
    te_params, unet_params = groups[0]["params"], groups[1]["params"]
    assert len(te_params) == 2 * len(network.text_encoder_loras)
    assert len(unet_params) == 2 * len(network.unet_loras)
    assert {id(p) for p in te_params + unet_params} == {id(p) for p in network.parameters()}
    assert all(p.requires_grad for p in network.parameters())
    unet_only = make_network(sd15, train_text_encoder=False)
    assert [g["name"] for g in unet_only.param_groups(unet_lr=1.0, text_encoder_lr=1.0)] == ["unet"]
    assert not any(k.startswith("lora_te") for k in unet_only.kohya_state_dict())
    te_only = make_network(sd15, train_unet=False)
    assert all(k.startswith("lora_te_") for k in te_only.kohya_state_dict())


def test_gradients_reach_only_lora_weights(sd15):
    arch, unet, _ = sd15
    unet.requires_grad_(False)
    network = make_network(sd15, train_text_encoder=False, conv_dim=2)
    randomize_up(network)
    network.apply_to()
    try:
        x = torch.randn(1, 4, 8, 8)
        ctx = torch.randn(1, 7, arch.unet["cross_attention_dim"])
        unet(x, torch.tensor([10]), encoder_hidden_states=ctx).sample.pow(2).mean().backward()
    finally:
        network.remove()
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


def test_state_dict_keys_and_dtype(sd15):
    network = make_network(sd15)
    sd = network.kohya_state_dict(torch.float16)
    assert len(sd) == 3 * len(network.all_loras)
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert all(k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for k in sd)
    assert all(sd[f"{lora.lora_name}.alpha"].ndim == 0 for lora in network.all_loras)
    sd[next(iter(sd))].add_(1.0)  # a copy: changing it leaves the network alone
    assert not torch.equal(network.kohya_state_dict(torch.float16)[next(iter(sd))], sd[next(iter(sd))])


def test_load_round_trip_and_alpha_from_file(sd15):
    source = make_network(sd15, conv_dim=2)
    randomize_up(source, seed=3)
    sd = source.kohya_state_dict()
    name = "lora_unet_mid_block_attentions_0_proj_in"
    sd[f"{name}.alpha"] = torch.tensor(1.0)
    del sd["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]
    target = make_network(sd15, conv_dim=2)
    target.load_kohya_state_dict(sd)
    loaded = target.kohya_state_dict()
    for key, value in sd.items():
        torch.testing.assert_close(loaded[key], value)
    by_name = {lora.lora_name: lora for lora in target.all_loras}
    assert by_name[name].scale == 1.0 / 4
    assert float(loaded["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]) == 4.0  # missing alpha = dim
    assert by_name["lora_te_text_model_encoder_layers_0_mlp_fc1"].scale == 1.0


def test_load_rejects_mismatches(sd15):
    network = make_network(sd15)
    sd = network.kohya_state_dict()
    with pytest.raises(ModelError, match="missing key"):
        network.load_kohya_state_dict({k: v for k, v in sd.items() if "mid_block" not in k})
    with pytest.raises(ModelError, match="unexpected key"):
        network.load_kohya_state_dict({**sd, "lora_unet_foo.lora_down.weight": torch.zeros(4, 4)})
    with pytest.raises(ModelError, match="network_dim"):
        make_network(sd15, network_dim=8).load_kohya_state_dict(sd)
    partial = {k: v for k, v in sd.items() if k.startswith("lora_te_")}
    other = make_network(sd15)
    before = other.kohya_state_dict()
    other.load_kohya_state_dict({**partial, "lora_unet_extra.alpha": torch.tensor(1.0)}, strict=False)
    after = other.kohya_state_dict()
    assert all(torch.equal(after[k], sd[k]) for k in partial)
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("lora_unet_"))


def test_invalid_arguments(sd15):
    _, unet, tes = sd15
    with pytest.raises(ModelError, match="unknown model family"):
        LoRANetwork(family="sd3", unet=unet, text_encoders=tes, network_dim=4, network_alpha=1)
    with pytest.raises(ConfigError, match="train nothing"):
        make_network(sd15, train_unet=False, train_text_encoder=False)
    with pytest.raises(ConfigError, match="network_dropout"):
        make_network(sd15, dropout=1.5)
    with pytest.raises(ConfigError, match="rank"):
        make_network(sd15, network_dim=0)
    with pytest.raises(ModelError, match="no layer"):
        LoRANetwork(
            family="sd_1_5",
            unet=nn.Sequential(nn.Linear(2, 2)),
            text_encoders=[],
            network_dim=4,
            network_alpha=1,
        )


def test_sdxl_forward_changes_and_restores(sdxl):
    base, base_te2 = unet_out(sdxl), te_out(sdxl, 1)
    network = make_network(sdxl, conv_dim=2)
    randomize_up(network)
    network.apply_to()
    try:
        assert (unet_out(sdxl) - base).abs().max() > 1e-3
        assert (te_out(sdxl, 1) - base_te2).abs().max() > 1e-3
    finally:
        network.remove()
    assert torch.equal(unet_out(sdxl), base)
    assert torch.equal(te_out(sdxl, 1), base_te2)


def test_torch_load_state_dict_refreshes_scale(sd15):
    network = make_network(sd15)
    sd = network.state_dict()
    first = network.unet_loras[0]
    sd[f"{first.lora_name}.alpha"] = torch.tensor(1.0)
    network.load_state_dict(sd)
    assert first.scale == 1.0 / 4 and float(first.alpha) == 1.0


def test_remove_restores_a_forward_patched_before():
    layer = nn.Linear(3, 3)
    layer.forward = lambda x: x * 0  # e.g. a hook another library installed on the instance
    patched = layer.forward
    lora = LoRAModule("lora_p", layer, dim=1, alpha=1)
    with torch.no_grad():
        lora.lora_up.weight.fill_(1.0)
    lora.apply_to()
    x = torch.ones(1, 3)
    torch.testing.assert_close(layer(x), lora.lora_delta(x))  # the earlier patch still runs underneath
    lora.remove()
    assert layer.forward is patched


def _trained_lora(layer: nn.Module, **kwargs: float) -> LoRAModule:
    lora = LoRAModule("x", layer, dim=4, alpha=2.0, **kwargs)  # type: ignore[arg-type]
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    return lora


def test_module_dropout_skips_the_whole_update_in_training_only() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    lora = _trained_lora(layer, module_dropout=1.0)
    x = torch.randn(2, 3, 6)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    lora.train()
    torch.testing.assert_close(layer(x), base)  # dropped: the original output alone
    lora.eval()
    assert not torch.allclose(layer(x), base)
    other = nn.Linear(6, 5)
    half = _trained_lora(other, module_dropout=0.5)
    half.train()
    plain = torch.nn.functional.linear(x, other.weight, other.bias)
    torch.manual_seed(1)
    outcomes = {bool(torch.allclose(other(x), plain)) for _ in range(40)}
    assert outcomes == {True, False}  # some steps skip the update, some keep it


@pytest.mark.parametrize("shape", [(2, 3, 6), (2, 6, 4, 4)])
def test_rank_dropout_masks_rank_channels_per_sample_and_rescales(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer: nn.Module = nn.Linear(6, 5) if len(shape) == 3 else nn.Conv2d(6, 5, 1)
    lora = _trained_lora(layer, rank_dropout=0.5)
    lora.train()
    x = torch.randn(*shape)
    torch.manual_seed(7)
    delta = lora.lora_delta(x)
    torch.manual_seed(7)
    keep = torch.rand(shape[0], 4) > 0.5  # the draw sd-scripts makes: one mask per sample and rank channel
    down = lora.lora_down(x)
    if len(shape) == 3:
        masked = down * keep.unsqueeze(1)
        expected = lora.lora_up(masked) * (lora.scale / 0.5)
    else:
        masked = down * keep[:, :, None, None]
        expected = lora.lora_up(masked) * (lora.scale / 0.5)
    torch.testing.assert_close(delta, expected)
    lora.eval()
    torch.testing.assert_close(lora.lora_delta(x), lora.lora_up(down) * lora.scale)  # off outside training
