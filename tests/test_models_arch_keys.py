"""Architectures and the original<->diffusers key mapping, checked against diffusers' own single-file converter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu

from kohya_backend.assets.checkpoints import random_components
from kohya_backend.errors import ModelError
from kohya_backend.models.arch import (
    Architecture,
    architecture_for,
    architecture_from_json,
    architecture_to_json,
    sd15_architecture,
    sdxl_architecture,
)
from kohya_backend.models.ldm_keys import (
    SDXL_TE2_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    conversion_tables,
    diffusers_to_ldm_state_dict,
    ldm_to_diffusers_state_dicts,
    unet_diffusers_to_ldm,
    vae_diffusers_to_ldm,
)


def _meta_state_dicts(arch: Architecture) -> tuple[dict, dict, list[dict]]:
    with torch.device("meta"):
        unet, vae, tes = arch.build_unet(), arch.build_vae(), arch.build_text_encoders()
    return unet.state_dict(), vae.state_dict(), [te.state_dict() for te in tes]


def _count(ldm: dict, prefix: str) -> int:
    return sum(k.startswith(prefix) for k in ldm)


def _same_shapes(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    bad = [k for k in ours if tuple(ours[k].shape) != tuple(theirs[k].shape)]
    assert bad == []


@pytest.fixture(scope="module")
def sd15_full() -> tuple[Architecture, dict, tuple]:
    arch = sd15_architecture()
    sds = _meta_state_dicts(arch)
    return arch, diffusers_to_ldm_state_dict(arch, *sds), sds


@pytest.fixture(scope="module")
def sdxl_full() -> tuple[Architecture, dict, tuple]:
    arch = sdxl_architecture()
    sds = _meta_state_dicts(arch)
    return arch, diffusers_to_ldm_state_dict(arch, *sds), sds


def test_sd15_full_ldm_key_counts_and_shapes(sd15_full) -> None:
    _, ldm, _ = sd15_full
    assert _count(ldm, UNET_PREFIX) == 686
    assert _count(ldm, VAE_PREFIX) == 248
    te = [k for k in ldm if k.startswith("cond_stage_model.transformer.text_model.")]
    assert len(te) == 197 and "cond_stage_model.transformer.text_model.embeddings.position_ids" in te
    assert len(ldm) == 686 + 248 + 197
    assert ldm["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert ldm["model.diffusion_model.output_blocks.11.0.skip_connection.weight"].shape == (320, 640, 1, 1)
    assert ldm["model.diffusion_model.middle_block.1.proj_in.weight"].shape == (1280, 1280, 1, 1)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ldm["first_stage_model.decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert ldm["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    token = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    assert ldm[token].shape == (49408, 768)
    assert sfu.infer_diffusers_model_type(ldm) == "v1"


def test_sdxl_full_ldm_key_counts_and_shapes(sdxl_full) -> None:
    _, ldm, _ = sdxl_full
    assert _count(ldm, UNET_PREFIX) == 1680
    assert _count(ldm, VAE_PREFIX) == 248
    assert _count(ldm, "conditioner.embedders.0.transformer.text_model.") == 197
    assert _count(ldm, SDXL_TE2_PREFIX) == 389
    assert len(ldm) == 1680 + 248 + 197 + 389
    assert ldm["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert ldm["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (
        1280,
        2048,
    )
    assert ldm["model.diffusion_model.output_blocks.2.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert ldm[SDXL_TE2_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert ldm[SDXL_TE2_PREFIX + "text_projection"].shape == (1280, 1280)
    assert ldm[SDXL_TE2_PREFIX + "positional_embedding"].shape == (77, 1280)
    assert sfu.infer_diffusers_model_type(ldm) == "xl_base"


@pytest.mark.parametrize("fixture", ["sd15_full", "sdxl_full"])
def test_full_unet_and_vae_match_diffusers_converter(fixture, request) -> None:
    arch, ldm, (unet_sd, vae_sd, _) = request.getfixturevalue(fixture)
    _same_shapes(sfu.convert_ldm_unet_checkpoint(ldm, arch.unet), unet_sd)
    _same_shapes(sfu.convert_ldm_vae_checkpoint(ldm, arch.vae), vae_sd)


@pytest.mark.parametrize("fixture", ["sd15_full", "sdxl_full"])
def test_full_text_encoders_match_diffusers_converter(fixture, request) -> None:
    arch, ldm, (_, _, te_sds) = request.getfixturevalue(fixture)
    clip = sfu.convert_ldm_clip_checkpoint(ldm)
    clip = {k.removeprefix("text_model."): v for k, v in clip.items() if not k.endswith("position_ids")}
    _same_shapes(clip, te_sds[0])
    if arch.family == "sd_xl":
        with torch.device("meta"):
            te2 = arch.build_text_encoders()[1]
        _same_shapes(sfu.convert_open_clip_checkpoint(te2, ldm, prefix=SDXL_TE2_PREFIX), te_sds[1])


@pytest.mark.parametrize("family", ["sd_1_5", "sd_xl"])
def test_tiny_values_match_diffusers_converter(family) -> None:
    """Our LDM tensors, converted back by diffusers, equal the originals: fused q/k/v order, transposes, 1x1s."""
    arch = architecture_for(family, "tiny")
    unet, vae, tes = random_components(arch, seed=3)
    ldm = diffusers_to_ldm_state_dict(
        arch, unet.state_dict(), vae.state_dict(), [t.state_dict() for t in tes]
    )
    pairs = [
        (sfu.convert_ldm_unet_checkpoint(ldm, arch.unet), unet.state_dict()),
        (sfu.convert_ldm_vae_checkpoint(ldm, arch.vae), vae.state_dict()),
    ]
    clip = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ldm).items()}
    clip.pop("embeddings.position_ids")
    pairs.append((clip, tes[0].state_dict()))
    if family == "sd_xl":
        pairs.append(
            (sfu.convert_open_clip_checkpoint(tes[1], ldm, prefix=SDXL_TE2_PREFIX), tes[1].state_dict())
        )
    for theirs, ours in pairs:
        assert set(theirs) == set(ours)
        assert [k for k in ours if not torch.equal(theirs[k], ours[k])] == []


@pytest.mark.parametrize("family", ["sd_1_5", "sd_xl"])
def test_tiny_round_trip_is_exact(family) -> None:
    arch = architecture_for(family, "tiny")
    unet, vae, tes = random_components(arch, seed=1)
    originals = [unet.state_dict(), vae.state_dict(), *[t.state_dict() for t in tes]]
    ldm = diffusers_to_ldm_state_dict(arch, originals[0], originals[1], originals[2:])
    unet_sd, vae_sd, te_sds = ldm_to_diffusers_state_dicts(arch, ldm)
    for back, original in zip([unet_sd, vae_sd, *te_sds], originals):
        assert set(back) == set(original)
        assert all(torch.equal(back[k], original[k]) for k in original)
    # distinct random values everywhere: a swapped pair of keys could not go unnoticed
    flat = {float(v.flatten()[0]) for v in originals[1].values() if v.is_floating_point()}
    assert len(flat) > 0.9 * len(originals[1])


def test_unet_names_follow_the_original_layout() -> None:
    assert (
        unet_diffusers_to_ldm("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 2)
        == "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    )
    assert unet_diffusers_to_ldm("mid_block.attentions.0.proj_in", 2) == "middle_block.1.proj_in"
    assert (
        unet_diffusers_to_ldm("up_blocks.0.attentions.0.proj_out.weight", 2)
        == "output_blocks.0.1.proj_out.weight"
    )
    assert (
        unet_diffusers_to_ldm("down_blocks.0.resnets.1.conv1.weight", 2)
        == "input_blocks.2.0.in_layers.2.weight"
    )
    assert unet_diffusers_to_ldm("down_blocks.2.downsamplers.0.conv", 2) == "input_blocks.9.0.op"
    assert (
        unet_diffusers_to_ldm("up_blocks.3.resnets.2.conv_shortcut", 2)
        == "output_blocks.11.0.skip_connection"
    )
    assert unet_diffusers_to_ldm("mid_block.resnets.1.time_emb_proj", 2) == "middle_block.2.emb_layers.1"
    assert unet_diffusers_to_ldm("time_embedding.linear_2.bias", 2) == "time_embed.2.bias"
    assert unet_diffusers_to_ldm("down_blocks.1.resnets.0", 1) == "input_blocks.3.0"
    sd15_up = sd15_architecture().up_block_types
    assert unet_diffusers_to_ldm("up_blocks.0.upsamplers.0.conv", 2, sd15_up) == "output_blocks.2.1.conv"
    assert unet_diffusers_to_ldm("up_blocks.1.upsamplers.0.conv", 2, sd15_up) == "output_blocks.5.2.conv"
    with pytest.raises(ValueError, match="up_block_types"):
        unet_diffusers_to_ldm("up_blocks.1.upsamplers.0.conv", 2)
    for bad in ("unknown.layer", "down_blocks.x.resnets.0", "mid_block.attentions.1"):
        with pytest.raises(ValueError, match="cannot map"):
            unet_diffusers_to_ldm(bad, 2)
    with pytest.raises(ValueError, match="outside the model"):
        unet_diffusers_to_ldm("up_blocks.9.upsamplers.0.conv", 2, sd15_up)


def test_sdxl_transformer_modules_give_kohya_lora_names() -> None:
    """Every SDXL UNet LoRA module name sd-scripts writes is produced by the mapping (722 of them)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    arch = sdxl_architecture()
    with torch.device("meta"):
        unet = arch.build_unet()
    names = set()
    for path, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            for sub, child in module.named_modules():
                if isinstance(child, torch.nn.Linear):
                    ldm = unet_diffusers_to_ldm(f"{path}.{sub}", arch.layers_per_block, arch.up_block_types)
                    names.add("lora_unet_" + ldm.replace(".", "_"))
    reference = Path(__file__).parent / "data" / "kohya-lora-keys-sdxl-dim8.tsv"  # see tests/data/README.md
    with open(reference, encoding="utf-8") as fh:
        expected = {line.split("\t")[0].split(".")[0] for line in fh if line.startswith("lora_unet")}
    assert len(names) == 722
    assert names == expected


def test_vae_names_follow_the_original_layout() -> None:
    assert (
        vae_diffusers_to_ldm("decoder.up_blocks.0.resnets.2.conv1.weight", 4)
        == "decoder.up.3.block.2.conv1.weight"
    )
    assert (
        vae_diffusers_to_ldm("encoder.down_blocks.1.downsamplers.0.conv.bias", 4)
        == "encoder.down.1.downsample.conv.bias"
    )
    assert (
        vae_diffusers_to_ldm("encoder.mid_block.attentions.0.to_out.0.weight", 4)
        == "encoder.mid.attn_1.proj_out.weight"
    )
    assert (
        vae_diffusers_to_ldm("decoder.mid_block.resnets.1.norm2.bias", 4) == "decoder.mid.block_2.norm2.bias"
    )
    assert vae_diffusers_to_ldm("encoder.conv_norm_out.weight", 4) == "encoder.norm_out.weight"
    assert vae_diffusers_to_ldm("quant_conv.weight", 4) == "quant_conv.weight"


def test_tables_cover_every_module_key_once() -> None:
    for arch in (sd15_architecture("mid"), sdxl_architecture("tiny")):
        for table in conversion_tables(arch):
            covered = [k for rule in table.rules for k in rule.diffusers]
            assert sorted(covered) == sorted(table.diffusers_shapes)
            assert len({rule.ldm for rule in table.rules}) == len(table.rules)


def test_reader_reports_missing_unexpected_and_mismatched_keys() -> None:
    arch = sd15_architecture("tiny")
    unet, vae, tes = random_components(arch)
    ldm = diffusers_to_ldm_state_dict(arch, unet.state_dict(), vae.state_dict(), [tes[0].state_dict()])
    ldm = dict(ldm)
    ldm.pop("model.diffusion_model.out.2.bias")
    ldm["model.diffusion_model.extra_layer.weight"] = torch.zeros(1)
    ldm["first_stage_model.quant_conv.bias"] = torch.zeros(3)
    ldm["model_ema.decay"] = torch.tensor(0.99)  # harmless extras are ignored
    ldm["alphas_cumprod"] = torch.ones(1000)
    with pytest.raises(ModelError) as info:
        ldm_to_diffusers_state_dicts(arch, ldm, source="checkpoint demo.safetensors")
    text = str(info.value)
    assert "demo.safetensors" in text
    assert "1 missing key(s): model.diffusion_model.out.2.bias" in text
    assert "1 unexpected key(s): model.diffusion_model.extra_layer.weight" in text
    assert "first_stage_model.quant_conv.bias (3,) (expected (8,))" in text
    assert "model_ema" not in text and "alphas_cumprod" not in text


def test_old_clip_layout_without_text_model_is_accepted() -> None:
    arch = sd15_architecture("tiny")
    unet, vae, tes = random_components(arch)
    ldm = diffusers_to_ldm_state_dict(arch, unet.state_dict(), vae.state_dict(), [tes[0].state_dict()])
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in ldm.items()}
    _, _, te_sds = ldm_to_diffusers_state_dicts(arch, old)
    assert all(torch.equal(te_sds[0][k], v) for k, v in tes[0].state_dict().items())


def test_architecture_json_round_trip_and_errors() -> None:
    for arch in (sd15_architecture(), sd15_architecture("mid"), sdxl_architecture("tiny")):
        assert architecture_from_json(architecture_to_json(arch)) == arch
    with pytest.raises(ValueError, match="lacks"):
        architecture_from_json('{"family": "sd_1_5"}')
    with pytest.raises(ValueError, match="unknown family"):
        text = architecture_to_json(sd15_architecture("tiny")).replace('"sd_1_5"', '"sd_3"')
        architecture_from_json(text)
    with pytest.raises(ValueError, match="unknown"):
        sdxl_architecture("mid")


def test_architecture_sizes() -> None:
    mid = sd15_architecture("mid")
    assert mid.unet["block_out_channels"] == [128, 256, 512] and mid.layers_per_block == 1
    assert mid.unet["cross_attention_dim"] == 768 and mid.text_encoders[0]["hidden_size"] == 768
    tiny = sdxl_architecture("tiny")
    hidden = [te["hidden_size"] for te in tiny.text_encoders]
    assert hidden[0] != hidden[1] and tiny.unet["cross_attention_dim"] == sum(hidden)
    assert (
        tiny.unet["projection_class_embeddings_input_dim"] == 6 * 8 + tiny.text_encoders[1]["projection_dim"]
    )
    assert (sd15_architecture().latent_scale, sdxl_architecture().latent_scale) == (0.18215, 0.13025)
    assert (sd15_architecture().resolution, sdxl_architecture().resolution) == (512, 1024)
