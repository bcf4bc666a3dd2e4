"""Full-size SD 1.5 / SDXL (built on the meta device): our LoRA keys and shapes equal what sd-scripts writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kohya_backend.lora.network import LoRANetwork, lora_targets
from kohya_backend.lora.save import SAVE_DTYPES
from kohya_backend.models.arch import sd15_architecture, sdxl_architecture

REFERENCE = Path(__file__).parent / "data"  # vendored: see tests/data/README.md for where they come from
TSV_DTYPES = {"F32": torch.float32, "float32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_reference(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    path = REFERENCE / name
    out = {}
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
        out[key] = (dims, TSV_DTYPES[dtype])
    return out


def meta_models(arch):
    with torch.device("meta"):
        return arch.build_unet(), arch.build_text_encoders()


@pytest.fixture(scope="module")
def sd15_full():
    arch = sd15_architecture("full")
    return arch, *meta_models(arch)


@pytest.fixture(scope="module")
def sdxl_full():
    arch = sdxl_architecture("full")
    return arch, *meta_models(arch)


def network(model, **kwargs) -> LoRANetwork:
    arch, unet, tes = model
    return LoRANetwork(
        family=arch.family,
        unet=unet,
        text_encoders=tes,
        network_dim=8,
        network_alpha=8,
        unet_layers_per_block=arch.layers_per_block,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("fixture", "tsv", "n_unet", "n_te"),
    [
        ("sd15_full", "kohya-lora-keys-sd15-dim8.tsv", 192, 72),
        ("sdxl_full", "kohya-lora-keys-sdxl-dim8.tsv", 722, 264),
    ],
)
def test_keys_and_shapes_match_sd_scripts(request, fixture, tsv, n_unet, n_te):
    model = request.getfixturevalue(fixture)
    reference = read_reference(tsv)
    net = network(model)
    assert (len(net.unet_loras), len(net.text_encoder_loras)) == (n_unet, n_te)
    dtype = SAVE_DTYPES["float"]
    sd = net.kohya_state_dict(dtype)
    assert sorted(sd) == sorted(reference)
    wrong = {k: (tuple(v.shape), reference[k][0]) for k, v in sd.items() if tuple(v.shape) != reference[k][0]}
    assert wrong == {}
    assert {v.dtype for v in sd.values()} == {ref_dtype for _, ref_dtype in reference.values()} == {dtype}
    assert all(v.is_meta for v in sd.values())  # nothing was allocated for the full-size model


def test_sdxl_text_encoder_split(sdxl_full):
    arch, _, tes = sdxl_full
    names = [n for n, _ in lora_targets(family=arch.family, unet=None, text_encoders=tes, conv=False)]
    assert sum(n.startswith("lora_te1_") for n in names) == 72
    assert sum(n.startswith("lora_te2_") for n in names) == 192


@pytest.mark.parametrize(
    ("fixture", "n_extra", "examples"),
    [
        (
            "sd15_full",
            86,
            {
                "lora_unet_down_blocks_0_resnets_0_conv1": (4, 320, 3, 3),
                "lora_unet_down_blocks_1_resnets_0_conv_shortcut": (8, 320, 1, 1),
                "lora_unet_down_blocks_1_downsamplers_0_conv": (4, 640, 3, 3),
                "lora_unet_mid_block_resnets_1_time_emb_proj": (8, 1280),
                "lora_unet_up_blocks_0_upsamplers_0_conv": (4, 1280, 3, 3),
                "lora_unet_up_blocks_3_resnets_2_conv2": (4, 320, 3, 3),
            },
        ),
        (
            "sdxl_full",
            66,
            {
                "lora_unet_input_blocks_1_0_in_layers_2": (4, 320, 3, 3),
                "lora_unet_input_blocks_3_0_op": (4, 320, 3, 3),
                "lora_unet_input_blocks_4_0_skip_connection": (8, 320, 1, 1),
                "lora_unet_middle_block_2_emb_layers_1": (8, 1280),
                "lora_unet_output_blocks_2_2_conv": (4, 1280, 3, 3),
                "lora_unet_output_blocks_5_2_conv": (4, 640, 3, 3),
                "lora_unet_output_blocks_8_0_out_layers_3": (4, 320, 3, 3),
            },
        ),
    ],
)
def test_locon_full_size(request, fixture, n_extra, examples):
    model = request.getfixturevalue(fixture)
    plain = {k.split(".")[0] for k in network(model).kohya_state_dict()}
    sd = network(model, conv_dim=4, conv_alpha=1).kohya_state_dict()
    extra = {k.split(".")[0] for k in sd} - plain
    assert len(extra) == n_extra
    for name, down_shape in examples.items():
        assert name in extra
        assert tuple(sd[f"{name}.lora_down.weight"].shape) == down_shape
        up = sd[f"{name}.lora_up.weight"].shape
        assert up[1] == down_shape[0] and tuple(up[2:]) == ((1, 1) if len(down_shape) == 4 else ())
    for name in extra:
        is_3x3 = sd[f"{name}.lora_down.weight"].shape[-1] == 3 and sd[f"{name}.lora_down.weight"].ndim == 4
        assert sd[f"{name}.lora_down.weight"].shape[0] == (4 if is_3x3 else 8)
