"""Model-family detection of single-file checkpoints from their key names, and the FM-type check."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kohya_backend.errors import FamilyMismatchError, ModelError
from kohya_backend.families import FM_TYPES, OTHER_FAMILY_LABELS, family_label
from kohya_backend.models.keys import read_keys

SUPPORTED_FM_TYPES = FM_TYPES
FAMILY_NAMES = {name: family_label(name) for name in (*FM_TYPES, *OTHER_FAMILY_LABELS)}

_UNET = "model.diffusion_model."
_SD1_TE = "cond_stage_model.transformer."
_SD2_TE = "cond_stage_model.model."
_XL_TE1 = "conditioner.embedders.0.transformer."
_XL_TE2 = "conditioner.embedders.1.model."
_XL_REFINER_TE = "conditioner.embedders.0.model."


def detect_family(keys: Iterable[str]) -> str:
    """Tell the family of an original-layout checkpoint from its text encoder keys.

    Returns "sd_1_5" (CLIP-L under cond_stage_model.transformer), "sd_2" (OpenCLIP under cond_stage_model.model),
    "sd_xl" (CLIP-L + OpenCLIP bigG under conditioner.embedders.0/1), "sd_xl_refiner" (OpenCLIP only under
    conditioner.embedders.0.model) or "unknown" (no UNet, or no text encoder to tell by).
    """
    prefixes = {_SD1_TE: False, _SD2_TE: False, _XL_TE1: False, _XL_TE2: False, _XL_REFINER_TE: False}
    has_unet = False
    for key in keys:
        has_unet = has_unet or key.startswith(_UNET)
        for prefix, seen in prefixes.items():
            if not seen and key.startswith(prefix):
                prefixes[prefix] = True
    if not has_unet:
        return "unknown"
    if prefixes[_XL_TE1] and prefixes[_XL_TE2]:
        return "sd_xl"
    if prefixes[_XL_REFINER_TE] and not prefixes[_XL_TE2]:
        return "sd_xl_refiner"
    if prefixes[_SD1_TE]:
        return "sd_1_5"
    if prefixes[_SD2_TE]:
        return "sd_2"
    return "unknown"


def _unknown_reason(keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "it is a LoRA, not a base model"
    if keys and all(k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv")) for k in keys):
        return "it is a VAE only"
    if any(k.startswith(("down_blocks.", "unet.", "text_encoder.")) for k in keys):
        return "it is in the diffusers multi-folder key layout, not a single-file checkpoint"
    if not any(k.startswith(_UNET) for k in keys):
        return "it has no UNet (model.diffusion_model.*)"
    return "it has no text encoder this trainer knows (UNet-only files cannot be trained)"


def check_family(path: Path, fm_type: str) -> str:
    """Check that the checkpoint at `path` belongs to the chosen FM type; returns the detected family.

    Raises FamilyMismatchError when it is the other supported family, ModelError when it is of an
    unsupported family (SD 2.x, SDXL refiner) or unrecognised. Only the keys are read.
    """
    path = Path(path)
    _check_fm_type(fm_type)
    return check_family_of_keys(read_keys(path), path.name, fm_type)


def _check_fm_type(fm_type: str) -> None:
    if fm_type not in SUPPORTED_FM_TYPES:
        raise ModelError(
            f"FM type {fm_type!r} is not supported",
            hint=f"choose one of {', '.join(SUPPORTED_FM_TYPES)}",
        )


def check_family_of_keys(keys: Iterable[str], name: str, fm_type: str) -> str:
    """`check_family` on keys already read from the checkpoint called `name`."""
    _check_fm_type(fm_type)
    keys = list(keys)
    family = detect_family(keys)
    if family == fm_type:
        return family
    if family in SUPPORTED_FM_TYPES:
        raise FamilyMismatchError(
            f"model {name} is an {FAMILY_NAMES[family]} checkpoint but FM type {fm_type} was chosen",
            hint=f"choose {family} or another model",
        )
    if family == "unknown":
        raise ModelError(
            f"model {name} is not a Stable Diffusion 1.5 or SDXL checkpoint: {_unknown_reason(keys)}",
            hint=f"choose a full single-file {FAMILY_NAMES[fm_type]} checkpoint",
        )
    raise ModelError(
        f"model {name} is an {FAMILY_NAMES[family]} checkpoint, which this trainer does not support",
        hint=f"choose an {FAMILY_NAMES[fm_type]} checkpoint (supported FM types: {', '.join(SUPPORTED_FM_TYPES)})",
    )
