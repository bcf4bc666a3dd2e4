"""The model families this project trains (FM types), and everything that differs between them, in one place.

Torch-free: the config schema, the UI, the job scheduler, metadata and the trainer all read it. The torch side
(how each family tokenises, conditions and calls its UNet) registers against these names in
`train/conditioning.py`; a name it does not know here is an error there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Family:
    """One trainable model family: its names, formats, defaults and the switches the trainer branches on."""

    name: str  # the FM type: "sd_1_5", "sd_xl"
    label: str  # shown in the UI: "SD 1.5"
    sidecar_sd_version: str  # the WebUI sidecar's "sd version"
    base_model_version: str  # kohya's ss_base_model_version ...
    base_model_version_v: str  # ... for a v-prediction model
    modelspec_architecture: str
    modelspec_implementation: str
    resolution: int  # native training resolution (square)
    bucket_step: int  # bucket_reso_steps must be a multiple of this
    min_vram_gb: float  # what a LoRA run needs at the native resolution with the usual memory savers
    latent_scale: float  # VAE latents are scaled by this
    tokenizer_repos: tuple[
        str, ...
    ]  # one Hugging Face repo per text encoder (its tokenizer, for offline caches)
    te_lora_prefixes: tuple[str, ...]  # kohya's LoRA key prefix per text encoder
    unet_lora_layout: str  # "diffusers" (SD 1.5) or "ldm" (SDXL: the original SAI block names)
    uses_clip_skip: bool  # kohya honours clip_skip (SDXL always takes the penultimate layers)
    uses_time_ids: bool  # the UNet takes pooled text embeddings and size/crop time ids (SDXL)
    vae_overflows_in_fp16: bool  # its VAE gives NaN/black images in fp16 unless no_half_vae
    sample_pipeline: str  # the diffusers pipeline class that renders samples
    config_defaults: Mapping[str, Any] = field(default_factory=dict)  # config_params defaults that differ
    template: Mapping[str, Any] = field(default_factory=dict)  # the starting config's family-specific values

    @property
    def text_encoder_count(self) -> int:
        """How many text encoders the family conditions on."""
        return len(self.tokenizer_repos)

    def base_model_version_for(self, prediction_type: str) -> str:
        """kohya's ss_base_model_version for a model predicting "epsilon" or "v"."""
        return self.base_model_version_v if prediction_type == "v" else self.base_model_version


_CLIP_L = "openai/clip-vit-large-patch14"
_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; registering a name twice is an error."""
    if family.name in _REGISTRY:
        raise ValueError(f"model family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


SD15 = register(
    Family(
        name="sd_1_5",
        label="SD 1.5",
        sidecar_sd_version="SD1",
        base_model_version="sd_v1",
        base_model_version_v="sd_v1_v",
        modelspec_architecture="stable-diffusion-v1/lora",
        modelspec_implementation="diffusers",
        resolution=512,
        bucket_step=64,
        min_vram_gb=6.0,
        latent_scale=0.18215,
        tokenizer_repos=(_CLIP_L,),
        te_lora_prefixes=("lora_te",),
        unet_lora_layout="diffusers",
        uses_clip_skip=True,
        uses_time_ids=False,
        vae_overflows_in_fp16=False,
        sample_pipeline="StableDiffusionPipeline",
        config_defaults=MappingProxyType({"resolution": (512, 512)}),
        template=MappingProxyType({"resolution": (512, 512), "clip_skip": 2}),
    )
)
SDXL = register(
    Family(
        name="sd_xl",
        label="SDXL",
        sidecar_sd_version="SDXL",
        base_model_version="sdxl_base_v1-0",
        base_model_version_v="sdxl_base_v1-0",
        modelspec_architecture="stable-diffusion-xl-v1-base/lora",
        modelspec_implementation="https://github.com/Stability-AI/generative-models",
        resolution=1024,
        bucket_step=32,
        min_vram_gb=12.0,
        latent_scale=0.13025,
        tokenizer_repos=(_CLIP_L, "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
        te_lora_prefixes=("lora_te1", "lora_te2"),
        unet_lora_layout="ldm",
        uses_clip_skip=False,
        uses_time_ids=True,
        vae_overflows_in_fp16=True,
        sample_pipeline="StableDiffusionXLPipeline",
        config_defaults=MappingProxyType({"resolution": (1024, 1024), "no_half_vae": True}),
        template=MappingProxyType({"resolution": (1024, 1024), "no_half_vae": True}),
    )
)

FAMILIES: Mapping[str, Family] = MappingProxyType(_REGISTRY)
FM_TYPES: tuple[str, ...] = tuple(_REGISTRY)

# Families a checkpoint can be detected as but this project does not train, with their names for people.
OTHER_FAMILY_LABELS: Mapping[str, str] = MappingProxyType(
    {"sd_2": "SD 2.x", "sd_xl_refiner": "SDXL refiner", "unknown": "unrecognised"}
)


def family_for(name: str) -> Family:
    """The registered family of an FM type; ValueError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown FM type {name!r}; known: {', '.join(FM_TYPES)}") from None


def family_label(name: str) -> str:
    """How people call a (detected) family: "SD 1.5", "SDXL", "SD 2.x", ...; the name itself when unknown."""
    found = _REGISTRY.get(name)
    return found.label if found is not None else OTHER_FAMILY_LABELS.get(name, name)
