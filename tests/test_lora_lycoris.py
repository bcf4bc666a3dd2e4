"""LyCORIS networks (network_module = "lycoris.kohya") built by lycoris-lora: the key names lycoris itself writes for
kohya's models, the weight each saved file means to the WebUIs (their key logic reproduced below), loading back,
max-norm, LoRA+ groups and the network_args checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kohya_backend.config.validate import validate_config
from kohya_backend.errors import ModelError
from kohya_backend.lora.lycoris import LycorisNetwork
from kohya_backend.lora.network import LoRANetwork
from kohya_backend.lora.save import load_lora, save_lora
from kohya_backend.models.arch import sd15_architecture, sdxl_architecture
from kohya_backend.train.state import NETWORK_FILE

ALGOS = ["locon", "loha", "lokr", "ia3", "dylora", "glora", "diag-oft", "full"]
REFERENCE = Path("/work/shared/reference")


@pytest.fixture(scope="module")
def sd15():
    torch.manual_seed(0)
    arch = sd15_architecture("tiny")
    return arch, arch.build_unet().eval(), [te.eval() for te in arch.build_text_encoders()]


def build(model, algo: str, **args: str) -> LycorisNetwork:
    arch, unet, tes = model
    return LycorisNetwork(
        family=arch.family,
        unet=unet,
        text_encoders=tes,
        network_dim=4,
        network_alpha=2.0,
        network_args={"algo": algo, **args},
        unet_layers_per_block=arch.layers_per_block,
    )


def randomize(network: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ key names
@pytest.mark.parametrize("algo", ALGOS)
def test_keys_are_what_lycoris_writes_for_kohyas_sd15_model(sd15, algo: str) -> None:
    """lycoris-lora run directly on the model laid out as sd-scripts has it (transformers 4's text_model level)."""
    from lycoris.kohya import create_network

    _, unet, tes = sd15
    holder = nn.Module()
    holder.text_model = tes[0]  # sd-scripts' CLIPTextModel keeps transformers 4's "text_model." level
    kwargs = {"algo": algo, "conv_dim": "4", "conv_alpha": "1"}
    ours = build(sd15, algo, conv_dim="4", conv_alpha="1")
    expected = shapes(ours.kohya_state_dict())
    ours.remove()
    reference = create_network(1.0, 4, 2.0, None, holder, unet, **kwargs)
    reference.apply_to(holder, unet, apply_text_encoder=True, apply_unet=True)
    try:
        got = shapes(reference.state_dict())
    finally:
        for lora in reference.loras:
            lora.restore()
    assert expected == got
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in got)
    assert "lora_unet_conv_in" in {k.split(".")[0] for k in got}


def test_sdxl_keys_use_kohyas_sai_layout() -> None:
    """Full-size SDXL on the meta device: transformer modules are exactly kohya's LoRA modules (reference list),
    the conv blocks exactly kohya's LoCon modules, and the diffusers-only names of the full preset are absent."""
    arch = sdxl_architecture("full")
    with torch.device("meta"):
        unet, tes = arch.build_unet(), arch.build_text_encoders()
        ours = LycorisNetwork(
            family="sd_xl",
            unet=unet,
            text_encoders=tes,
            network_dim=8,
            network_alpha=8,
            network_args={"algo": "locon", "conv_dim": "8"},
            unet_layers_per_block=arch.layers_per_block,
        )
        locon = LoRANetwork(
            family="sd_xl",
            unet=unet,
            text_encoders=tes,
            network_dim=8,
            network_alpha=8,
            conv_dim=8,
            unet_layers_per_block=arch.layers_per_block,
        )
    names = {lora.lora_name for lora in ours.all_loras}
    assert names == {lora.lora_name for lora in locon.all_loras}
    assert not {n for n in names if n.startswith(("lora_unet_input_blocks_0_", "lora_unet_time_embed"))}
    assert not {n for n in names if "label_emb" in n or n.startswith("lora_unet_out_")}
    reference = REFERENCE / "kohya-lora-keys-sdxl-dim8.tsv"
    if not reference.is_file():
        pytest.skip(f"{reference} is not on this machine (the checks above ran)")
    kohya_lora = {line.split("\t")[0].split(".")[0] for line in reference.read_text().splitlines()}
    assert kohya_lora <= names


def test_attn_only_preset_finds_sd_scripts_cross_attention(sd15) -> None:
    net = build(sd15, "loha", preset="attn-only")
    suffixes = {lora.lora_name.rsplit("_attn", 1)[-1] for lora in net.unet_loras}
    assert net.unet_loras and suffixes == {
        "1_to_q",
        "1_to_k",
        "1_to_v",
        "1_to_out_0",
        "2_to_q",
        "2_to_k",
        "2_to_v",
        "2_to_out_0",
    }
    net.remove()


# ------------------------------------------------------------------------------------------------ what the WebUIs apply
def _webui_update(w: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight change AUTOMATIC1111 1.10 / Forge compute from one module's keys (network_lora, network_hada,
    network_lokr, network_ia3, network_oft: calc_updown then finalize_updown's alpha/dim scale)."""
    if "hada_w1_a" in w:
        dim = w["hada_w1_b"].shape[0]
        one = w["hada_w1_a"] @ w["hada_w1_b"].reshape(dim, -1)
        two = w["hada_w2_a"] @ w["hada_w2_b"].reshape(dim, -1)
        return (one * two).reshape(weight.shape) * (float(w["alpha"]) / dim)
    if "lokr_w1" in w or "lokr_w1_a" in w:
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        dim = (
            w["lokr_w2_b"].shape[0]
            if "lokr_w2_b" in w
            else w["lokr_w1_b"].shape[0]
            if "lokr_w1_b" in w
            else None
        )
        if w2.ndim == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        update = torch.kron(w1, w2.contiguous()).reshape(weight.shape)
        return update * (float(w["alpha"]) / dim if dim else 1.0)
    if "on_input" in w:
        scale = w["weight"] if float(w["on_input"]) else w["weight"].reshape(-1, *([1] * (weight.ndim - 1)))
        return weight * scale
    if "oft_blocks" in w:
        blocks = w["oft_blocks"]
        k, n, _ = blocks.shape
        q = blocks - blocks.transpose(1, 2)
        norm, limit = q.norm(), float(w["alpha"]) * weight.shape[0]
        q = q * ((torch.clamp(norm, max=limit) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(n)
        rotation = (eye + q) @ torch.inverse(eye - q)
        rotated = torch.einsum("knm,kn...->km...", rotation, weight.reshape(k, n, *weight.shape[1:]))
        return rotated.reshape(weight.shape) - weight
    down, up = w["lora_down.weight"], w["lora_up.weight"]
    dim = down.shape[0]
    return (up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)).reshape(weight.shape) * (
        float(w["alpha"]) / dim
    )


@pytest.mark.parametrize(
    ("algo", "args"),
    [
        ("locon", {}),
        ("loha", {}),
        ("lokr", {"factor": "4"}),
        ("lokr", {}),
        ("ia3", {}),
        ("diag-oft", {"constraint": "0.5"}),
    ],
)
def test_the_webuis_key_logic_gives_the_weights_lycoris_trains(sd15, algo: str, args: dict[str, str]) -> None:
    net = build(sd15, algo, conv_dim="4", conv_alpha="1", **args)
    randomize(net)
    net.apply_to()
    net.eval()
    sd = net.kohya_state_dict()
    gen = torch.Generator().manual_seed(3)
    checked = {nn.Linear: 0, nn.Conv2d: 0}
    try:
        for lora in net.all_loras:
            layer = lora.org_module[0]
            kind = type(layer)
            if kind not in checked or checked[kind] >= 6:
                continue
            keys = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[0] == lora.lora_name}
            x = torch.randn(2, layer.in_features, generator=gen) if kind is nn.Linear else None
            if kind is nn.Conv2d:
                x = torch.randn(1, layer.in_channels, 6, 6, generator=gen)
            with torch.no_grad():
                merged = layer.weight + _webui_update(keys, layer.weight)
                if kind is nn.Linear:
                    expected = nn.functional.linear(x, merged, layer.bias)
                else:
                    expected = nn.functional.conv2d(x, merged, layer.bias, layer.stride, layer.padding)
                torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
            checked[kind] += 1
    finally:
        net.remove()
    assert checked[nn.Linear] == 6
    assert checked[nn.Conv2d] == 6


def test_apply_remove_and_multiplier(sd15) -> None:
    arch, unet, _ = sd15
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 7, arch.unet["cross_attention_dim"], generator=torch.Generator().manual_seed(1))

    def out() -> torch.Tensor:
        with torch.no_grad():
            return unet(x, torch.tensor([10]), encoder_hidden_states=ctx).sample

    base = out()
    net = build(sd15, "loha")
    randomize(net, scale=0.3)
    net.apply_to()
    net.apply_to()  # idempotent
    adapted = out()
    assert not torch.allclose(base, adapted)
    net.set_multiplier(0.0)
    torch.testing.assert_close(out(), base)
    net.set_multiplier(1.0)
    torch.testing.assert_close(out(), adapted)
    net.remove()
    torch.testing.assert_close(out(), base)


# ------------------------------------------------------------------------------------------------ saving and loading
@pytest.mark.parametrize("algo", ["locon", "loha", "lokr", "dylora", "glora", "ia3", "diag-oft", "full"])
def test_saved_files_and_training_states_load_back(sd15, tmp_path: Path, algo: str) -> None:
    """As the trainer does: load into a network already applied to the model (algo=full keeps only the change)."""
    from safetensors.torch import load_model, save_model

    source = build(sd15, algo, block_size="2")
    source.apply_to()
    randomize(source, seed=4, scale=0.01)
    saved = source.kohya_state_dict()
    save_lora(tmp_path / "a.safetensors", saved, {}, save_precision="float")
    save_model(source, str(tmp_path / NETWORK_FILE), force_contiguous=True)
    source.remove()
    target = build(sd15, algo, block_size="2")
    target.apply_to()
    sd, _ = load_lora(tmp_path / "a.safetensors")
    target.load_kohya_state_dict(sd)
    exact = 1e-6 if algo == "full" else 0  # full stores weight - original: one rounding step
    for key, value in target.kohya_state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=exact, msg=key)
    target.remove()
    again = build(sd15, algo, block_size="2")
    again.apply_to()
    load_model(again, str(tmp_path / NETWORK_FILE), strict=True)  # what resume does
    for key, value in again.kohya_state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=exact, msg=key)
    again.remove()


def test_weights_of_another_algorithm_are_refused(sd15) -> None:
    loha = build(sd15, "loha")
    sd = loha.kohya_state_dict()
    loha.remove()
    lokr = build(sd15, "lokr")
    with pytest.raises(ModelError, match="lokr weights do not fit") as info:
        lokr.load_kohya_state_dict(sd)
    assert "hada_w1_a" in str(info.value) and "algo" in (info.value.hint or "")
    lokr.remove()


def test_max_norm_through_lycoris(sd15) -> None:
    net = build(sd15, "locon")
    randomize(net, scale=2.0)
    stats = net.apply_max_norm_regularization(0.5)
    assert stats.keys_scaled == len(net.all_loras)
    with torch.no_grad():
        norms = [float(lora.get_diff_weight(multiplier=1.0)[0].norm()) for lora in net.all_loras]
    assert max(norms) == pytest.approx(0.5, rel=1e-4)
    assert stats.max_norm == pytest.approx(0.5, rel=1e-4)
    net.remove()


def test_param_groups_with_loraplus(sd15) -> None:
    net = build(sd15, "locon", loraplus_lr_ratio="4")
    groups = {g["name"]: g for g in net.param_groups(unet_lr=1e-4, text_encoder_lr=1e-5)}
    assert set(groups) == {"text_encoder", "text_encoder_plus", "unet", "unet_plus"}
    assert groups["unet_plus"]["lr"] == pytest.approx(4e-4) and groups["text_encoder"]["lr"] == 1e-5
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(net.parameters()))
    net.remove()


def test_an_empty_selection_is_an_error(sd15) -> None:
    with pytest.raises(ModelError, match="found no layer"):
        build(sd15, "ia3", preset="ia3")


# ------------------------------------------------------------------------------------------------ config checks
def _config(**values: object):
    base: dict[str, object] = {"network_module": "lycoris.kohya", "network_dim": 8}
    return validate_config({**base, **values}, "sd_1_5", require_paths=False, check_paths_exist=False)


def test_network_args_as_the_gui_writes_them_are_accepted() -> None:
    gui = "preset=full conv_dim=8 conv_alpha=1 use_tucker=False rank_dropout=0.1 bypass_mode=False dora_wd=False "
    gui += 'module_dropout=0.1 factor=-1 use_cp=False use_scalar=False decompose_both=False algo="lokr" train_norm=False'
    config = _config(network_args=gui.split())
    assert config.network_kwargs["algo"] == '"lokr"'
    assert [w.message for w in config.warnings] == []


@pytest.mark.parametrize(
    ("args", "fragment", "is_error"),
    [
        (["algo=lohaa"], "did you mean loha", True),
        (["algo=boft"], "BOFT fails", True),
        (["algo=lokr", "preset=my_preset.toml"], "builtin presets", True),
        (["algo=ia3", "preset=ia3"], "finds no layer", True),
        (["algo=dylora", "block_size=3"], "multiple of block_size", True),
        (["algo=loha", "rank_dropout=2"], "outside 0..1", True),
        (["algo=loha", "use_tucker=0"], "every value except False", False),
        (["algo=loha", "train_on_input=True"], "does not read train_on_input", False),
        (["algo=loha", "conv_dmi=4"], "did you mean conv_dim", False),
        (["algo=glora"], "cannot apply GLoRA", False),
        (["algo=diag-oft"], "constraint=0", False),
        (["algo=dylora"], "block_size times weaker", False),
    ],
)
def test_network_args_checks(args: list[str], fragment: str, is_error: bool) -> None:
    from kohya_backend.errors import ConfigError

    if is_error:
        with pytest.raises(ConfigError) as info:
            _config(network_args=args)
        assert any(fragment in f"{i.message} {i.hint}" for i in info.value.issues), info.value.issues
    else:
        config = _config(network_args=args)
        assert any(fragment in f"{w.message} {w.hint}" for w in config.warnings), config.warnings


def test_network_dropout_is_not_read_by_lycoris() -> None:
    config = _config(network_args=["algo=loha"], network_dropout=0.1)
    assert [w.key for w in config.warnings] == ["network_dropout"]
