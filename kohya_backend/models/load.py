"""Lean loading of a single-file SD 1.5 / SDXL checkpoint into diffusers and transformers modules.

The family is checked before anything is built. Modules are created on the meta device (no weight init, no
memory), then receive the checkpoint's tensors with `load_state_dict(assign=True, strict=True)`, cast to the
requested dtype on the way in: the only copy made is that cast (none when the dtype already matches).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn

from kohya_backend.errors import ModelError
from kohya_backend.models.arch import (
    ARCHITECTURE_METADATA_KEY,
    Architecture,
    architecture_for,
    architecture_from_json,
)
from kohya_backend.models.checkpoint import SAFETENSORS_SUFFIXES, read_checkpoint, read_metadata
from kohya_backend.models.detect import check_family, check_family_of_keys
from kohya_backend.models.diffusers_folder import (
    check_folder_family,
    fit_text_encoder_keys,
    folder_architecture,
    is_diffusers_folder,
    read_component,
)
from kohya_backend.models.frozen import frozen_weight_dtypes, route_frozen_layers
from kohya_backend.models.ldm_keys import ldm_to_diffusers_state_dicts
from kohya_backend.models.pages import release_tensor_pages
from kohya_backend.models.tokenizers import load_tokenizers


@dataclass
class LoadedModel:
    """A loaded checkpoint: frozen modules in eval mode (UNet, VAE, text encoders), tokenizers and provenance."""

    family: str
    arch: Architecture
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)


def checkpoint_architecture(
    path: Path, family: str, metadata: Mapping[str, str] | None = None
) -> Architecture:
    """The architecture of a checkpoint: the JSON our generator stores in its metadata, else the full-size one."""
    meta = read_metadata(path) if metadata is None else metadata
    text = meta.get(ARCHITECTURE_METADATA_KEY)
    if text is None:
        return architecture_for(family, "full")
    try:
        arch = architecture_from_json(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(
            f"checkpoint {path} has an unreadable {ARCHITECTURE_METADATA_KEY} metadata entry: {exc}",
            hint="regenerate the file, or remove that metadata entry to load it as a full-size model",
        ) from exc
    if arch.family != family:
        raise ModelError(
            f"checkpoint {path} declares a {arch.family} architecture but its keys are those of {family}",
            hint="regenerate the file; its metadata does not match its weights",
        )
    return arch


def _materialise(
    module: nn.Module,
    state: dict[str, Tensor],
    *,
    dtype: torch.dtype,
    device: str,
    what: str,
    path: Path,
    mapped: bool,
    keep_file_precision: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load `state` into a meta-built `module` in place (cast per tensor, no second copy), freeze it.

    When `mapped` (tensors memory-mapped from the file), each source a cast or a move has copied gives its pages
    back at once: an fp16 SDXL file loaded in fp32 would otherwise hold 6.9 GB of file pages on top of the
    13.9 GB of weights until the whole load is done. With `keep_file_precision`, frozen Linear/Conv2d weights
    stored below `dtype` are not cast at all: they compute in `dtype` as their layers run (models/frozen.py); with
    `compute_dtype` they are stored in it (models/frozen.frozen_weight_dtypes).
    """
    kept = frozen_weight_dtypes(
        module, state, dtype, keep_file_precision=keep_file_precision, compute_dtype=compute_dtype
    )
    for key in list(state):
        tensor = state[key]
        if key in kept:
            moved = tensor.to(device=device, dtype=kept[key])
        elif tensor.is_floating_point():
            moved = tensor.to(device=device, dtype=dtype)
        else:
            moved = tensor.to(device)
        if mapped and moved.data_ptr() != tensor.data_ptr():
            release_tensor_pages([tensor])
        state[key] = moved
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"the {what} weights of {path} do not fit the architecture: {exc}") from exc
    state.clear()
    module.to(device)  # buffers created outside the meta context (e.g. CLIP's position_ids)
    module.requires_grad_(False)
    route_frozen_layers(module, only=set(kept))
    return module.eval()


def load_checkpoint(
    path: Path,
    fm_type: str,
    *,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    device: str = "cpu",
    tokenizer_dir: Path | None = None,
    keep_file_precision: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a single-file checkpoint of FM type `fm_type` ("sd_1_5"/"sd_xl") with its offline tokenizers.

    Raises FamilyMismatchError / ModelError (wrong or unsupported family, unreadable file, missing or unexpected
    keys) and TokenizerUnavailableError. The UNet and text encoders are cast to `dtype`, the VAE to `vae_dtype`
    (default `dtype`). The returned modules are frozen (requires_grad False) and in eval mode. With
    `keep_file_precision` and an fp32 `dtype`, Linear/Conv2d weights the file stores in fp16/bf16 stay so (and
    memory-mapped), computing in fp32 with the same results: half the memory, no load-time copy. With
    `compute_dtype` (bf16, for a CPU run under bf16 autocast) and an fp32 `dtype`, the UNet's and text encoders'
    Linear/Conv2d weights are stored in it, as autocast would cast them on every call; the VAE, which encodes
    outside autocast, is left as `vae_dtype` and `keep_file_precision` say.
    """
    path = Path(path)
    if is_diffusers_folder(path):
        return _load_diffusers_folder(
            path,
            fm_type,
            dtype=dtype,
            vae_dtype=vae_dtype,
            device=device,
            tokenizer_dir=tokenizer_dir,
            keep_file_precision=keep_file_precision,
            compute_dtype=compute_dtype,
        )
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        family = check_family(path, fm_type)  # header only: nothing is read for the wrong family
        ldm_sd, metadata = read_checkpoint(path)  # memory-mapped
    else:
        ldm_sd, metadata = read_checkpoint(path)  # a pickle is read once, then checked
        family = check_family_of_keys(ldm_sd, path.name, fm_type)
    arch = checkpoint_architecture(path, family, metadata)
    vocab_limit = min(int(te["vocab_size"]) for te in arch.text_encoders)
    beside = path.parent / "tokenizer" if tokenizer_dir is None else None
    tokenizers = load_tokenizers(
        family, tokenizer_dir=tokenizer_dir, vocab_size_limit=vocab_limit, beside_dir=beside
    )

    unet_sd, vae_sd, te_sds = ldm_to_diffusers_state_dicts(arch, ldm_sd, source=f"checkpoint {path}")
    del ldm_sd
    with init_empty_weights(include_buffers=False):
        unet = arch.build_unet()
        vae = arch.build_vae()
        text_encoders = arch.build_text_encoders()
    # .safetensors tensors are file-backed mappings whose pages may be released; a legacy .ckpt's are not
    mapped = path.suffix.lower() in SAFETENSORS_SUFFIXES
    common: dict[str, Any] = {
        "device": device,
        "path": path,
        "mapped": mapped,
        "keep_file_precision": keep_file_precision,
    }
    _materialise(unet, unet_sd, dtype=dtype, what="UNet", compute_dtype=compute_dtype, **common)
    _materialise(vae, vae_sd, dtype=vae_dtype or dtype, what="VAE", **common)
    for index, (te, te_sd) in enumerate(zip(text_encoders, te_sds)):
        te_what = f"text encoder {index + 1}"
        _materialise(te, te_sd, dtype=dtype, what=te_what, compute_dtype=compute_dtype, **common)
    return LoadedModel(family, arch, unet, vae, text_encoders, tokenizers, path, metadata)


def _load_diffusers_folder(
    path: Path,
    fm_type: str,
    *,
    dtype: torch.dtype,
    vae_dtype: torch.dtype | None,
    device: str,
    tokenizer_dir: Path | None,
    keep_file_precision: bool,
    compute_dtype: torch.dtype | None,
) -> LoadedModel:
    """A diffusers folder (model_index.json, unet/, vae/, text_encoder[_2]/, tokenizer[_2]/), built from its own
    configs and weights; its tokenizer folders are used unless tokenizer_dir names others."""
    family = check_folder_family(path, fm_type)
    arch = folder_architecture(path, family)
    vocab_limit = min(int(te["vocab_size"]) for te in arch.text_encoders)
    tokenizers = load_tokenizers(family, tokenizer_dir=tokenizer_dir or path, vocab_size_limit=vocab_limit)
    with init_empty_weights(include_buffers=False):
        unet = arch.build_unet()
        vae = arch.build_vae()
        text_encoders = arch.build_text_encoders()
    common: dict[str, Any] = {
        "device": device,
        "path": path,
        "mapped": True,
        "keep_file_precision": keep_file_precision,
    }
    unet_sd = read_component(path / "unet")
    _materialise(unet, unet_sd, dtype=dtype, what="UNet", compute_dtype=compute_dtype, **common)
    _materialise(vae, read_component(path / "vae"), dtype=vae_dtype or dtype, what="VAE", **common)
    names = ["text_encoder", "text_encoder_2"][: len(text_encoders)]
    for index, (te, name) in enumerate(zip(text_encoders, names)):
        state = fit_text_encoder_keys(read_component(path / name), set(te.state_dict()))
        te_what = f"text encoder {index + 1}"
        _materialise(te, state, dtype=dtype, what=te_what, compute_dtype=compute_dtype, **common)
    return LoadedModel(family, arch, unet, vae, text_encoders, tokenizers, path, {})
