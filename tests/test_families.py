"""The family registry: one entry per trainable FM type, and every part of the trainer that differs per family
answers from it (no family names hard-wired elsewhere)."""

from __future__ import annotations

import dataclasses

import pytest

from kohya_backend.config.schema import SCHEMA, template_values
from kohya_backend.families import FAMILIES, FM_TYPES, SD15, SDXL, family_for, family_label, register
from kohya_backend.models.arch import architecture_for
from kohya_backend.train import conditioning


def test_the_registered_families_and_their_differences() -> None:
    assert FM_TYPES == ("sd_1_5", "sd_xl")
    assert (SD15.bucket_step, SDXL.bucket_step) == (64, 32)
    assert (SD15.base_model_version_for("v"), SDXL.base_model_version_for("v")) == (
        "sd_v1_v",
        "sdxl_base_v1-0",
    )
    assert SDXL.uses_time_ids and not SD15.uses_time_ids and SD15.uses_clip_skip and not SDXL.uses_clip_skip
    assert (family_label("sd_xl"), family_label("sd_2"), family_label("flux")) == ("SDXL", "SD 2.x", "flux")
    with pytest.raises(ValueError, match="unknown FM type 'flux'"):
        family_for("flux")


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(dataclasses.replace(SD15))


@pytest.mark.parametrize("name", FM_TYPES)
def test_every_family_is_complete_across_the_trainer(name: str) -> None:
    family = FAMILIES[name]
    conditioning.get_family(name)  # its conditioning override is registered
    arch = architecture_for(name, "tiny")
    assert (arch.latent_scale, len(arch.text_encoders)) == (family.latent_scale, family.text_encoder_count)
    assert len(family.te_lora_prefixes) == family.text_encoder_count
    for key, value in family.config_defaults.items():
        assert SCHEMA[key].default_for(name) == value
    assert template_values(name)["resolution"] == (family.resolution, family.resolution)


def test_conditioning_registers_only_known_families() -> None:
    class Other(conditioning.SD15Family):
        name = "flux"

    with pytest.raises(ValueError, match="not a model family"):
        conditioning.register_family(Other())
