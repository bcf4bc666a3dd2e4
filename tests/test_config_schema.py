"""The config_params schema: keys, defaults per FM type, unsupported keys, the AWS template."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit

from kohya_backend.config.parse import coerce_value
from kohya_backend.config.schema import (
    ALIASES,
    FM_TYPES,
    GROUPS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    SAMPLERS,
    SCHEMA,
    UNSUPPORTED,
    defaults_for,
    render_toml,
    template_toml,
)
from kohya_backend.config.validate import validate_config
from kohya_backend.errors import ConfigError

# Every key the issue names, plus the keys of kohya.md's Config section and the AWS template.
REQUIRED_KEYS = [
    "pretrained_model_name_or_path",
    "train_data_dir",
    "reg_data_dir",
    "output_dir",
    "output_name",
    "logging_dir",
    "tokenizer_cache_dir",
    "caption_extension",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "caption_prefix",
    "caption_suffix",
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "flip_aug",
    "random_crop",
    "cache_latents",
    "cache_latents_to_disk",
    "cache_text_encoder_outputs",
    "cache_text_encoder_outputs_to_disk",
    "vae_batch_size",
    "network_weights",
    "network_dropout",
    "network_args",
    "optimizer_args",
    "lr_scheduler_args",
    "lr_scheduler_power",
    "lr_scheduler_num_cycles",
    "lr_warmup_steps",
    "save_every_n_epochs",
    "save_every_n_steps",
    "save_last_n_epochs",
    "save_state",
    "save_state_on_train_end",
    "resume",
    "sample_prompts",
    "sample_every_n_epochs",
    "sample_every_n_steps",
    "sample_sampler",
    "min_timestep",
    "max_timestep",
    "max_data_loader_n_workers",
    "persistent_data_loader_workers",
    "training_comment",
    "no_half_vae",
    "v_parameterization",
    "prior_loss_weight",
    "max_grad_norm",
    "gradient_checkpointing",
    "gradient_accumulation_steps",
    "seed",
    "noise_offset",
    "min_snr_gamma",
    "clip_skip",
    "max_token_length",
    "xformers",
    "sdpa",
    "mem_eff_attn",
    "lowram",
    "highvram",
    "bucket_no_upscale",
    "bucket_reso_steps",
    "min_bucket_reso",
    "max_bucket_reso",
    "enable_bucket",
    "resolution",
    "train_batch_size",
    "max_train_steps",
    "max_train_epochs",
    "mixed_precision",
    "save_precision",
    "save_model_as",
    "network_module",
    "network_dim",
    "network_alpha",
    "unet_lr",
    "text_encoder_lr",
    "learning_rate",
    "optimizer_type",
    "lr_scheduler",
    "network_train_unet_only",
    "network_train_text_encoder_only",
    "v2",
    "save_n_epoch_ratio",
    "log_prefix",
]

KINDS = {"bool", "int", "float", "str", "path", "list", "resolution", "steps_or_fraction"}


def test_schema_has_every_required_key() -> None:
    missing = [k for k in REQUIRED_KEYS if k not in SCHEMA]
    assert missing == []


def test_every_spec_is_well_formed_and_its_default_is_valid() -> None:
    group_ids = [g for g, _ in GROUPS]
    for name, spec in SCHEMA.items():
        assert spec.name == name
        assert spec.kind in KINDS, name
        assert spec.group in group_ids, name
        assert spec.help and "\n" not in spec.help, name
        for fm in FM_TYPES:
            default = spec.default_for(fm)
            if default is not None:
                assert coerce_value(spec, default) == default, (name, fm)
            if spec.choices is not None and default is not None:
                assert default in spec.choices, name


def test_schema_order_follows_groups() -> None:
    """Keys of one group are contiguous and the groups come in GROUPS order (the canonical order)."""
    order = [g for g, _ in GROUPS]
    seen = [spec.group for spec in SCHEMA.values()]
    collapsed = [g for i, g in enumerate(seen) if i == 0 or seen[i - 1] != g]
    assert collapsed == [g for g in order if g in seen]


def test_defaults_follow_sd_scripts_and_fm_type() -> None:
    sd15, sdxl = defaults_for("sd_1_5"), defaults_for("sd_xl")
    assert sd15["resolution"] == (512, 512) and sdxl["resolution"] == (1024, 1024)
    assert sd15["no_half_vae"] is False and sdxl["no_half_vae"] is True
    kohya = {
        "network_dim": 4,
        "network_alpha": 1.0,
        "learning_rate": 2e-6,
        "optimizer_type": "AdamW",
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "lr_scheduler_num_cycles": 1,
        "max_train_steps": 1600,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "caption_extension": ".caption",
        "enable_bucket": False,
        "min_bucket_reso": 256,
        "max_bucket_reso": 1024,
        "bucket_reso_steps": 64,
        "mixed_precision": "no",
        "prior_loss_weight": 1.0,
        "max_grad_norm": 1.0,
        "network_module": "networks.lora",
        "save_model_as": "safetensors",
        "unet_lr": None,
        "text_encoder_lr": None,
        "max_token_length": 75,
    }
    for fm_defaults in (sd15, sdxl):
        assert {k: fm_defaults[k] for k in kohya} == kohya
    assert set(sd15) == set(SCHEMA)


def test_defaults_are_fresh_copies() -> None:
    first = defaults_for("sd_1_5")
    first["network_args"] = ("conv_dim=4",)
    assert defaults_for("sd_1_5")["network_args"] == ()  # list values are tuples: nothing shared can change


def test_unknown_fm_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        defaults_for("sd_2_1")
    assert info.value.issues[0].key == "fm_type"
    assert "sd_1_5" in (info.value.issues[0].hint or "")


def test_enumerations_match_the_issue() -> None:
    # every name sd-scripts' get_optimizer knows (library/train_util.py)
    assert set(OPTIMIZERS) == {
        *("AdamW", "AdamW8bit", "Lion", "Lion8bit", "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit"),
        *("PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Prodigy", "Adafactor"),
        *("DAdaptation", "DAdaptAdamPreprint", "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP"),
        *("DAdaptLion", "DAdaptSGD", "AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree"),
    }
    assert set(LR_SCHEDULERS) == {
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "adafactor",
    }
    assert SCHEMA["mixed_precision"].choices == ("no", "fp16", "bf16")
    assert set(SCHEMA["save_precision"].choices or ()) == {"fp16", "bf16", "float"}
    assert SCHEMA["max_token_length"].choices == (75, 150, 225)


def test_every_sampler_maps_to_a_diffusers_scheduler() -> None:
    diffusers = pytest.importorskip("diffusers")
    for name, sampler in SAMPLERS.items():
        assert hasattr(diffusers, sampler.scheduler), name
    assert {
        "ddim",
        "euler",
        "euler_a",
        "dpmsolver++",
        "k_euler",
        "k_euler_a",
        "pndm",
        "lms",
        "heun",
        "dpm_2",
    } <= set(SCHEMA["sample_sampler"].choices or ())
    # ddpm works in a prompt's --ss only: kohya leaves it out of sample_sampler's choices
    assert "ddpm" in SAMPLERS and "ddpm" not in (SCHEMA["sample_sampler"].choices or ())


def test_unsupported_keys_cover_the_issue_and_do_not_overlap_the_schema() -> None:
    named = [
        "full_fp16",
        "full_bf16",
        "fp8_base",
        "in_json",
        "face_crop_aug_range",
        "masked_loss",
        "use_8bit_adam",
        "deepspeed",
        "log_tracker_config",
        "vae",
    ]
    assert [k for k in named if k not in UNSUPPORTED] == []
    # the noise, loss and network options of kohya's presets are implemented
    implemented = ["huber_c", "huber_schedule", "loss_type", "multires_noise_iterations", "ip_noise_gamma"]
    implemented += ["v_pred_like_loss", "scale_weight_norms", "lr_scheduler_type", "zero_terminal_snr"]
    assert [k for k in implemented if k not in SCHEMA] == []
    assert not set(UNSUPPORTED) & set(SCHEMA)
    assert not set(ALIASES) & (set(SCHEMA) | set(UNSUPPORTED))
    assert all(new in SCHEMA for new in ALIASES.values())
    assert all("remove it" in why for why in UNSUPPORTED.values())


def _filled_template(fm_type: str, tmp_path: Path) -> str:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    data = tmp_path / "data" / "10_thing"
    data.mkdir(parents=True)
    text = template_toml(fm_type)
    text = text.replace(
        'pretrained_model_name_or_path = ""', f'pretrained_model_name_or_path = "{model.as_posix()}"'
    )
    return text.replace('train_data_dir = ""', f'train_data_dir = "{data.parent.as_posix()}"')


@pytest.mark.parametrize("fm_type", FM_TYPES)
def test_template_validates_once_paths_are_filled(fm_type: str, tmp_path: Path) -> None:
    config = validate_config(_filled_template(fm_type, tmp_path), fm_type, cuda_available=True)
    assert config.warnings == ()
    assert config.network_dim == 32 and config.network_alpha == 16.0
    assert config.unet_lr == 1e-4 and config.text_encoder_lr == 1e-5
    assert config.optimizer_type == "AdamW8bit" and config.lr_scheduler == "cosine_with_restarts"
    assert config.cache_latents and config.shuffle_caption and config.enable_bucket
    assert config.max_train_epochs == 10 and config.seed == 1337 and config.max_token_length == 225
    assert config.mixed_precision == "fp16" and config.save_precision == "fp16"
    assert config.caption_extension == ".txt" and config.save_every_n_epochs == 1
    if fm_type == "sd_xl":
        assert config.resolution == (1024, 1024) and config.no_half_vae is True
    else:
        assert config.resolution == (512, 512) and config.clip_skip == 2


@pytest.mark.parametrize("fm_type", FM_TYPES)
def test_template_without_paths_names_exactly_the_empty_paths(fm_type: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(template_toml(fm_type), fm_type, cuda_available=True)
    assert sorted(str(i.key) for i in info.value.issues) == [
        "pretrained_model_name_or_path",
        "train_data_dir",
    ]
    assert all(i.line is not None for i in info.value.issues)


@pytest.mark.parametrize("fm_type", FM_TYPES)
def test_template_for_a_machine_without_cuda_has_no_fp16(fm_type: str) -> None:
    assert 'mixed_precision = "fp16"' in template_toml(fm_type)
    text = template_toml(fm_type, cuda=False)
    assert 'mixed_precision = "no"' in text
    assert 'optimizer_type = "AdamW"' in text and 'optimizer_type = "AdamW8bit"' in template_toml(fm_type)
    with pytest.raises(ConfigError) as info:
        validate_config(text, fm_type, cuda_available=False)
    assert sorted(str(i.key) for i in info.value.issues) == [
        "pretrained_model_name_or_path",
        "train_data_dir",
    ]


def test_template_on_a_machine_without_cuda_asks_for_bf16(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(_filled_template("sd_1_5", tmp_path), "sd_1_5", cuda_available=False)
    [issue] = info.value.issues
    assert issue.key == "mixed_precision" and "bf16" in (issue.hint or "")


def test_render_toml_groups_keys_and_leaves_out_unset_values() -> None:
    values = defaults_for("sd_1_5")
    text = render_toml(values, ["network_dim", "seed", "learning_rate", "resolution"])
    assert tomlkit.parse(text).unwrap() == {"network_dim": 4, "learning_rate": 2e-6, "resolution": "512,512"}
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments == [
        "# Resolution and aspect-ratio buckets",
        "# LoRA network",
        "# Optimizer and learning rate",
    ]


def test_importing_the_config_package_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from kohya_backend.config import template_toml, validate_config, reference_markdown\n"
        "validate_config(template_toml('sd_xl').replace('mixed_precision = \"fp16\"', 'mixed_precision = \"bf16\"'),"
        " 'sd_xl', require_paths=False)\n"
        "reference_markdown()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr
