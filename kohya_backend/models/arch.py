"""Model architectures (UNet, VAE, text encoders) for SD 1.5 and SDXL, defined here, never fetched from a hub.

Each `Architecture` holds plain config dicts: a diffusers `UNet2DConditionModel` config, a diffusers
`AutoencoderKL` config and one transformers `CLIPTextConfig` dict per text encoder. Besides the full-size
models there are small variants ("mid", "tiny") used by tests, the demo and benchmarks; they keep the
structure of the full model (same block kinds and key layout) at a fraction of the size.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from torch import nn

from kohya_backend.families import FAMILIES as FAMILIES_BY_NAME
from kohya_backend.families import FM_TYPES, SD15, SDXL

FAMILIES = FM_TYPES
# Metadata entry (safetensors header, or top-level string of a .ckpt) holding a generated file's architecture.
ARCHITECTURE_METADATA_KEY = "train_management.architecture"

_SD_LATENT_SCALE = SD15.latent_scale
_SDXL_LATENT_SCALE = SDXL.latent_scale


@dataclass(frozen=True)
class Architecture:
    """Configs of every component of one model family at one size; builds the torch modules."""

    family: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    latent_scale: float
    resolution: int

    def build_unet(self) -> nn.Module:
        """Instantiate the diffusers UNet (wrap in `accelerate.init_empty_weights()` to skip weight init)."""
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(copy.deepcopy(self.unet))

    def build_vae(self) -> nn.Module:
        """Instantiate the diffusers AutoencoderKL."""
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(copy.deepcopy(self.vae))

    def build_text_encoders(self) -> list[nn.Module]:
        """Instantiate the transformers text encoders (SDXL's second one has the text projection)."""
        return [self.build_text_encoder(index) for index in range(len(self.text_encoders))]

    def build_text_encoder(self, index: int) -> nn.Module:
        """Instantiate text encoder `index` alone (CLIPTextModel, or CLIPTextModelWithProjection for bigG)."""
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        config = CLIPTextConfig(**self.text_encoders[index])
        cls = CLIPTextModelWithProjection if self.te_has_projection(index) else CLIPTextModel
        return cls(config)

    def te_has_projection(self, index: int) -> bool:
        """True for the text encoder stored with a text projection (SDXL's second, OpenCLIP bigG)."""
        return len(self.text_encoders) == 2 and index == 1

    @property
    def layers_per_block(self) -> int:
        """The UNet's resnets per down block (drives the original-layout block numbering)."""
        return int(self.unet.get("layers_per_block", 2))

    @property
    def up_block_types(self) -> list[str]:
        """The UNet's up block kinds, deepest first (upsampler numbering depends on them)."""
        return list(self.unet["up_block_types"])


def _clip_config(
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    vocab: int = 49408,
    act: str = "quick_gelu",
    projection: int | None = None,
) -> dict[str, Any]:
    # eos_token_id 2 keeps transformers' legacy pooling (argmax of the ids = the end token), which is what
    # the published SD/SDXL text encoder configs use; it works with any vocab whose end token is the last id.
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "projection_dim": projection if projection is not None else hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def _vae_config(channels: list[int], sample_size: int, scale: float, groups: int = 32) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": list(channels),
        "layers_per_block": 2,
        "act_fn": "silu",
        "norm_num_groups": groups,
        "sample_size": sample_size,
        "scaling_factor": scale,
    }


def _sd15_unet(channels: list[int], layers: int, ctx: int, heads: int, groups: int = 32) -> dict[str, Any]:
    n = len(channels)
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        "block_out_channels": list(channels),
        "layers_per_block": layers,
        "cross_attention_dim": ctx,
        "attention_head_dim": heads,
        "norm_num_groups": groups,
        "use_linear_projection": False,
    }


def sd15_architecture(size: str = "full") -> Architecture:
    """SD 1.5: "full" (the real model), "mid" (UNet 128/256/512, 1 layer per block, full CLIP-L and VAE) or "tiny"."""
    clip_l = _clip_config(hidden=768, layers=12, heads=12, intermediate=3072)
    if size == "full":
        unet = _sd15_unet([320, 640, 1280, 1280], layers=2, ctx=768, heads=8)
        vae = _vae_config([128, 256, 512, 512], 512, _SD_LATENT_SCALE)
        tes: tuple[dict[str, Any], ...] = (clip_l,)
    elif size == "mid":
        unet = _sd15_unet([128, 256, 512], layers=1, ctx=768, heads=8)
        vae = _vae_config([128, 256, 512, 512], 512, _SD_LATENT_SCALE)
        tes = (clip_l,)
    elif size == "tiny":
        unet = _sd15_unet([32, 64], layers=1, ctx=32, heads=2)
        vae = _vae_config([32, 32, 32, 32], 64, _SD_LATENT_SCALE)
        tes = (_clip_config(hidden=32, layers=3, heads=4, intermediate=64, vocab=1000),)
    else:
        raise ValueError(f"unknown SD 1.5 architecture size {size!r}: use 'full', 'mid' or 'tiny'")
    return Architecture(SD15.name, unet, vae, tes, _SD_LATENT_SCALE, SD15.resolution)


def _sdxl_unet(
    channels: list[int],
    depth: list[int],
    heads: list[int],
    ctx: int,
    time_dim: int,
    pooled_dim: int,
) -> dict[str, Any]:
    n = len(channels)
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        "block_out_channels": list(channels),
        "layers_per_block": 2,
        "transformer_layers_per_block": list(depth),
        "attention_head_dim": list(heads),
        "cross_attention_dim": ctx,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": 6 * time_dim + pooled_dim,
    }


def sdxl_architecture(size: str = "full") -> Architecture:
    """SDXL base: "full" (the real model) or "tiny" (two small text encoders with different hidden sizes)."""
    if size == "full":
        unet = _sdxl_unet([320, 640, 1280], [1, 2, 10], [5, 10, 20], ctx=2048, time_dim=256, pooled_dim=1280)
        vae = _vae_config([128, 256, 512, 512], 1024, _SDXL_LATENT_SCALE)
        vae["force_upcast"] = True
        tes: tuple[dict[str, Any], ...] = (
            _clip_config(hidden=768, layers=12, heads=12, intermediate=3072),
            _clip_config(hidden=1280, layers=32, heads=20, intermediate=5120, act="gelu", projection=1280),
        )
    elif size == "tiny":
        unet = _sdxl_unet([32, 64], [1, 2], [2, 4], ctx=32 + 64, time_dim=8, pooled_dim=64)
        vae = _vae_config([32, 32, 32, 32], 64, _SDXL_LATENT_SCALE)
        tes = (
            _clip_config(hidden=32, layers=3, heads=4, intermediate=64, vocab=1000),
            _clip_config(
                hidden=64, layers=3, heads=4, intermediate=128, vocab=1000, act="gelu", projection=64
            ),
        )
    else:
        raise ValueError(f"unknown SDXL architecture size {size!r}: use 'full' or 'tiny'")
    return Architecture(SDXL.name, unet, vae, tes, _SDXL_LATENT_SCALE, SDXL.resolution)


_BUILDERS = {SD15.name: sd15_architecture, SDXL.name: sdxl_architecture}


def architecture_for(family: str, size: str = "full") -> Architecture:
    """The architecture of `family` ("sd_1_5" or "sd_xl") at `size`."""
    builder = _BUILDERS.get(family)
    if builder is None:
        raise ValueError(f"unknown model family {family!r}: use one of {', '.join(FAMILIES)}")
    return builder(size)


def architecture_to_json(arch: Architecture) -> str:
    """Serialise an architecture (stored in our generated checkpoints' metadata)."""
    return json.dumps(
        {
            "family": arch.family,
            "unet": arch.unet,
            "vae": arch.vae,
            "text_encoders": list(arch.text_encoders),
            "latent_scale": arch.latent_scale,
            "resolution": arch.resolution,
        },
        sort_keys=True,
    )


def architecture_from_json(text: str) -> Architecture:
    """Parse `architecture_to_json` output; ValueError when it is not a valid architecture."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("architecture JSON must be an object")
    required = ("family", "unet", "vae", "text_encoders", "latent_scale", "resolution")
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"architecture JSON lacks {', '.join(missing)}")
    if data["family"] not in FAMILIES:
        raise ValueError(f"architecture JSON has unknown family {data['family']!r}")
    expected_tes = FAMILIES_BY_NAME[data["family"]].text_encoder_count
    if not isinstance(data["text_encoders"], list) or len(data["text_encoders"]) != expected_tes:
        raise ValueError(
            f"architecture JSON for {data['family']} needs {expected_tes} text encoder config(s)"
        )
    return Architecture(
        family=str(data["family"]),
        unet=dict(data["unet"]),
        vae=dict(data["vae"]),
        text_encoders=tuple(dict(te) for te in data["text_encoders"]),
        latent_scale=float(data["latent_scale"]),
        resolution=int(data["resolution"]),
    )
