"""Model-family detection from checkpoint keys, and the FM-type check with its error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kohya_backend.assets.checkpoints import write_checkpoint
from kohya_backend.errors import FamilyMismatchError, ModelError
from kohya_backend.models.arch import sd15_architecture, sdxl_architecture
from kohya_backend.models.detect import check_family, detect_family
from kohya_backend.models.ldm_keys import conversion_tables

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def _keys(arch) -> list[str]:
    return [rule.ldm for table in conversion_tables(arch) for rule in table.rules]


def _write_keys(path: Path, keys: list[str]) -> Path:
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detect")
    return {
        "sd_1_5": write_checkpoint(root / "sd15.safetensors", "sd_1_5"),
        "sd_xl": write_checkpoint(root / "sdxl.ckpt", "sd_xl", fmt="ckpt"),
    }


def test_full_architectures_are_detected() -> None:
    assert detect_family(_keys(sd15_architecture())) == "sd_1_5"
    assert detect_family(_keys(sdxl_architecture())) == "sd_xl"
    assert detect_family(_keys(sdxl_architecture("tiny"))) == "sd_xl"


def test_other_families_and_non_models() -> None:
    sd2 = [UNET_KEY, "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert detect_family(sd2) == "sd_2"
    refiner = [UNET_KEY, "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"]
    assert detect_family(refiner) == "sd_xl_refiner"
    assert detect_family(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]) == "unknown"
    assert detect_family(["encoder.conv_in.weight", "decoder.conv_out.weight"]) == "unknown"
    assert detect_family([UNET_KEY]) == "unknown"
    assert detect_family([]) == "unknown"


def test_check_family_accepts_matching_files(tiny_files) -> None:
    assert check_family(tiny_files["sd_1_5"], "sd_1_5") == "sd_1_5"
    assert check_family(tiny_files["sd_xl"], "sd_xl") == "sd_xl"


def test_check_family_mismatch_names_model_and_fix(tiny_files) -> None:
    with pytest.raises(FamilyMismatchError) as info:
        check_family(tiny_files["sd_xl"], "sd_1_5")
    text = str(info.value)
    assert "model sdxl.ckpt is an SDXL checkpoint but FM type sd_1_5 was chosen" in text
    assert "choose sd_xl or another model" in text
    with pytest.raises(FamilyMismatchError, match=r"SD 1\.5 checkpoint but FM type sd_xl"):
        check_family(tiny_files["sd_1_5"], "sd_xl")


def test_check_family_unsupported_and_unknown(tmp_path: Path) -> None:
    sd2 = _write_keys(
        tmp_path / "v2.safetensors", [UNET_KEY, "cond_stage_model.model.token_embedding.weight"]
    )
    with pytest.raises(ModelError, match=r"SD 2\.x checkpoint, which this trainer does not support") as info:
        check_family(sd2, "sd_1_5")
    assert not isinstance(info.value, FamilyMismatchError)
    refiner = _write_keys(
        tmp_path / "r.safetensors", [UNET_KEY, "conditioner.embedders.0.model.ln_final.weight"]
    )
    with pytest.raises(ModelError, match="SDXL refiner"):
        check_family(refiner, "sd_xl")
    lora = _write_keys(tmp_path / "style.safetensors", ["lora_unet_mid_block_attentions_0_proj_in.alpha"])
    with pytest.raises(ModelError, match=r"style\.safetensors .*it is a LoRA, not a base model"):
        check_family(lora, "sd_1_5")
    vae = _write_keys(tmp_path / "vae.safetensors", ["encoder.conv_in.weight", "decoder.conv_in.weight"])
    with pytest.raises(ModelError, match="VAE only"):
        check_family(vae, "sd_xl")
    unet_only = _write_keys(tmp_path / "unet.safetensors", [UNET_KEY])
    with pytest.raises(ModelError, match="no text encoder"):
        check_family(unet_only, "sd_1_5")


def test_check_family_rejects_unknown_fm_type(tiny_files) -> None:
    with pytest.raises(ModelError, match="FM type 'sd_3' is not supported"):
        check_family(tiny_files["sd_1_5"], "sd_3")
