"""Validation of config_params: each cross-field rule both ways, unknown/unsupported keys, positions, paths,
coercion of JSON input, and the TrainConfig helpers the trainer uses."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest

from kohya_backend.config.parse import ParsedConfig, parse_config
from kohya_backend.config.schema import NETWORK_ARGS
from kohya_backend.config.validate import TrainConfig, validate_config
from kohya_backend.errors import ConfigError, ConfigIssue


def check(source: str | dict[str, Any] | ParsedConfig, fm_type: str = "sd_1_5", **kwargs: Any) -> TrainConfig:
    kwargs.setdefault("require_paths", False)
    kwargs.setdefault("check_paths_exist", False)
    kwargs.setdefault("cuda_available", True)
    return validate_config(source, fm_type, **kwargs)


def errors(source: str | dict[str, Any], fm_type: str = "sd_1_5", **kwargs: Any) -> list[ConfigIssue]:
    """The issues of an invalid config (the test fails if the config is valid)."""
    with pytest.raises(ConfigError) as info:
        check(source, fm_type, **kwargs)
    assert all(i.severity == "error" for i in info.value.issues)
    return info.value.issues


def error_keys(source: str | dict[str, Any], fm_type: str = "sd_1_5", **kwargs: Any) -> list[str | None]:
    return [i.key for i in errors(source, fm_type, **kwargs)]


def warning_keys(config: TrainConfig) -> list[str | None]:
    assert all(w.severity == "warning" for w in config.warnings)
    return [w.key for w in config.warnings]


# --- cross-field rules, each both ways ---------------------------------------------------------------------


def test_cache_text_encoder_outputs_needs_unet_only() -> None:
    [issue] = errors({"cache_text_encoder_outputs": True})
    assert issue.key == "cache_text_encoder_outputs" and "network_train_unet_only" in issue.message
    assert check(
        {"cache_text_encoder_outputs": True, "network_train_unet_only": True}
    ).cache_text_encoder_outputs


def test_cache_text_encoder_outputs_refuses_changing_captions() -> None:
    base = {"cache_text_encoder_outputs": True, "network_train_unet_only": True}
    [issue] = errors({**base, "shuffle_caption": True, "caption_dropout_rate": 0.1})
    assert "shuffle_caption" in issue.message and "caption_dropout_rate" in issue.message
    assert check({**base, "shuffle_caption": False, "caption_dropout_rate": 0})


def test_disk_caches_turn_on_their_memory_cache() -> None:
    config = check(
        {
            "cache_latents_to_disk": True,
            "cache_text_encoder_outputs_to_disk": True,
            "network_train_unet_only": True,
        }
    )
    assert config.cache_latents and config.cache_text_encoder_outputs
    assert warning_keys(config) == ["cache_latents_to_disk", "cache_text_encoder_outputs_to_disk"]
    assert error_keys({"cache_text_encoder_outputs_to_disk": True}) == ["cache_text_encoder_outputs"]


def test_random_crop_cannot_use_cached_latents() -> None:
    assert error_keys({"random_crop": True, "cache_latents": True}) == ["random_crop"]
    assert check({"random_crop": True}).random_crop


def test_fp16_without_cuda_suggests_bf16_or_no() -> None:
    [issue] = errors('mixed_precision = "fp16"\n', cuda_available=False)
    assert issue.key == "mixed_precision" and (issue.line, issue.column) == (1, 1)
    assert "bf16" in (issue.hint or "") and '"no"' in (issue.hint or "")
    assert check({"mixed_precision": "fp16"}, cuda_available=True).mixed_precision == "fp16"
    assert check({"mixed_precision": "bf16"}, cuda_available=False).mixed_precision == "bf16"


def test_cuda_is_detected_when_not_given() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        assert check({"mixed_precision": "fp16"}, cuda_available=None).mixed_precision == "fp16"
    else:
        assert error_keys({"mixed_precision": "fp16"}, cuda_available=None) == ["mixed_precision"]


@pytest.mark.parametrize(
    ("fm_type", "step", "ok"),
    [
        ("sd_1_5", 64, True),
        ("sd_1_5", 128, True),
        ("sd_1_5", 32, False),
        ("sd_xl", 32, True),
        ("sd_xl", 48, False),
    ],
)
def test_bucket_reso_steps_multiple_per_fm_type(fm_type: str, step: int, ok: bool) -> None:
    config = {
        "bucket_reso_steps": step,
        "enable_bucket": True,
        "min_bucket_reso": 384,
        "max_bucket_reso": 1536,
    }
    if ok:
        assert check(config, fm_type).bucket_reso_steps == step
    else:
        [issue] = errors(config, fm_type)
        assert issue.key == "bucket_reso_steps" and str(32 if fm_type == "sd_xl" else 64) in issue.message
    # kohya reads the bucket settings only with enable_bucket: then any step is accepted (kohya_ss presets write 1)
    assert check({**config, "enable_bucket": False}, fm_type).bucket_reso_steps == step


def test_bucket_bounds_are_snapped_to_the_step_as_kohya_does() -> None:
    config = check({"enable_bucket": True, "min_bucket_reso": 250, "max_bucket_reso": 1000})
    # kohya lowers min and raises max to multiples of bucket_reso_steps, with a warning
    assert (config.min_bucket_reso, config.max_bucket_reso) == (192, 1024)
    assert warning_keys(config) == ["min_bucket_reso", "max_bucket_reso"]
    assert [w.hint for w in config.warnings] == [
        "write min_bucket_reso = 192",
        "write max_bucket_reso = 1024",
    ]
    assert (
        check({"min_bucket_reso": 320, "max_bucket_reso": 960, "enable_bucket": True}).max_bucket_reso == 960
    )
    config = {"min_bucket_reso": 1024, "max_bucket_reso": 512, "enable_bucket": True}
    assert error_keys(config) == ["min_bucket_reso"]


def test_resolution_within_bucket_bounds_only_when_bucketing() -> None:
    config = {"resolution": "1024,512", "max_bucket_reso": 768}
    assert error_keys({**config, "enable_bucket": True}) == ["resolution"]
    assert check({**config, "enable_bucket": False}).resolution == (1024, 512)


def test_unet_only_and_text_encoder_only_together_is_an_error() -> None:
    both = {"network_train_unet_only": True, "network_train_text_encoder_only": True}
    assert error_keys(both) == ["network_train_text_encoder_only"]
    assert check({"network_train_unet_only": True})
    assert check({"network_train_text_encoder_only": True})


def test_nothing_to_train_is_an_error() -> None:
    assert error_keys({"unet_lr": 0, "text_encoder_lr": 0}) == ["unet_lr"]
    assert error_keys({"network_train_unet_only": True, "unet_lr": 0}) == ["unet_lr"]
    assert check({"network_train_unet_only": True, "text_encoder_lr": 0}).text_encoder_lr == 0.0


def test_save_last_n_epochs_needs_an_epoch_interval() -> None:
    assert error_keys({"save_last_n_epochs": 3}) == ["save_last_n_epochs"]
    assert check({"save_last_n_epochs": 3, "save_every_n_epochs": 1}).save_last_n_epochs == 3
    assert check({"save_last_n_epochs": 3, "save_n_epoch_ratio": 2}).save_last_n_epochs == 3


def test_max_token_length_is_75_150_or_225() -> None:
    assert error_keys({"max_token_length": 100}) == ["max_token_length"]
    assert check({"max_token_length": "225"}).max_token_length == 225
    assert check({}).max_token_length == 75


def test_adafactor_scheduler_only_with_adafactor() -> None:
    [issue] = errors({"lr_scheduler": "adafactor", "optimizer_type": "AdamW"})
    assert issue.key == "lr_scheduler" and "Adafactor" in issue.message
    assert check({"lr_scheduler": "adafactor", "optimizer_type": "adafactor"}).optimizer_type == "Adafactor"


def test_network_module_is_lora_or_lycoris_and_kohyas_others_are_refused_precisely() -> None:
    assert check({"network_module": "networks.lora"}).network_module == "networks.lora"
    assert check({"network_module": "lycoris.kohya"}).network_module == "lycoris.kohya"
    [issue] = errors({"network_module": "networks.dylora"})
    assert issue.message.startswith("kohya accepts network_module") and "algo=dylora" in issue.message
    [issue] = errors({"network_module": "networks.oft"})
    assert "algo=diag-oft" in issue.message
    [issue] = errors({"network_module": "my.network"})
    assert "lycoris.kohya" in (issue.hint or "")


def test_network_args_locon_and_dropouts() -> None:
    config = check({"network_args": ["conv_dim=8", "conv_alpha=4"]})
    assert config.network_args == ("conv_dim=8", "conv_alpha=4")
    assert config.network_kwargs == {"conv_dim": "8", "conv_alpha": "4"}
    assert (config.conv_dim, config.conv_alpha) == (8, 4.0) and check({}).conv_dim is None
    values = {"conv_dim": "4", "conv_alpha": "4", "rank_dropout": "0.1", "module_dropout": "0.1"}
    assert set(values) == set(NETWORK_ARGS)
    assert check({"network_args": [f"{k}={v}" for k, v in values.items()]}).warnings == ()
    issues = errors({"network_args": ["down_lr_weight=1", "foo=1", "conv_dim=x", "rank_dropout=2"]})
    assert [i.key for i in issues] == ["network_args"] * 4
    messages = " | ".join(i.message for i in issues)
    assert "accepts down_lr_weight but this trainer does not implement it" in messages
    assert "rank_dropout: 2.0 is out of range" in messages
    assert "unknown network_args key 'foo'" in messages and "conv_dim" in messages
    alone = check({"network_args": ["conv_alpha=1"]})
    assert warning_keys(alone) == ["network_args"]


def test_save_model_as_safetensors_only() -> None:
    [issue] = errors({"save_model_as": "ckpt"})
    assert "kohya accepts" in issue.message and issue.hint == "choose one of safetensors"
    assert check({"save_model_as": "SafeTensors"}).save_model_as == "safetensors"


def test_v2_is_sd2_and_not_trained() -> None:
    [issue] = errors({"v2": True}, "sd_xl")
    assert issue.key == "v2" and "2.x" in issue.message
    assert check({"v2": False}).v2 is False


@pytest.mark.parametrize(
    "name",
    ["a/b", "a\\b", "..", "con", "nul .x", "aux.png", "x.safetensors", " padded", "x:y", "dot.", "tab\t", ""],
)
def test_output_name_must_be_a_safe_file_name(name: str) -> None:
    if name == "":
        assert check({"output_name": name}).output_name is None
        return
    assert error_keys({"output_name": name}) == ["output_name"]


@pytest.mark.parametrize("name", ["my_lora", "my lora-v1.2", "角色_v2", "con_test"])
def test_output_name_accepts_ordinary_names(name: str) -> None:
    assert check({"output_name": name}).output_name == name


def test_caption_extension_must_start_with_a_dot() -> None:
    assert error_keys({"caption_extension": "txt"}) == ["caption_extension"]
    assert check({"caption_extension": ".txt"}).caption_extension == ".txt"


def test_timesteps_must_be_ordered() -> None:
    assert error_keys({"min_timestep": 500, "max_timestep": 500}) == ["min_timestep"]
    assert check({"min_timestep": 100, "max_timestep": 900}).max_timestep == 900


def test_data_loader_worker_keys_are_accepted_with_a_warning_that_they_change_nothing() -> None:
    config = check("max_data_loader_n_workers = 0\npersistent_data_loader_workers = true\n")
    assert warning_keys(config) == ["max_data_loader_n_workers", "persistent_data_loader_workers"]
    assert all("changes nothing" in w.message and w.line for w in config.warnings)
    assert warning_keys(check({"max_data_loader_n_workers": 8})) == []  # kohya's default: nothing to say


def test_logging_keys() -> None:
    [issue] = errors({"log_with": "tensorboard"})
    assert issue.key == "log_with" and "logging_dir" in issue.message
    assert check({"log_with": "TensorBoard", "logging_dir": "logs"}).log_with == "tensorboard"
    [issue] = errors({"log_with": "wandb", "logging_dir": "logs"})
    assert "kohya accepts" in issue.message and "tensorboard" in issue.message
    assert warning_keys(check({"log_prefix": "a-", "log_tracker_name": "t"})) == [
        "log_prefix",
        "log_tracker_name",
    ]
    assert warning_keys(check({"logging_dir": "logs", "log_prefix": "a-", "log_tracker_name": "t"})) == []


def test_optimizer_and_scheduler_args_must_be_python_literals() -> None:
    [issue] = errors({"optimizer_args": ["d_coef=abc"]})
    assert issue.key == "optimizer_args" and "d_coef='abc'" in (issue.hint or "")
    config = check(
        {
            "optimizer_args": ["weight_decay=0.01", "betas=(0.9,0.99)", "decouple=True"],
            "lr_scheduler_args": "T_max=100",
        }
    )
    assert config.optimizer_args == ("weight_decay=0.01", "betas=(0.9,0.99)", "decouple=True")
    assert config.optimizer_kwargs == {"weight_decay": 0.01, "betas": (0.9, 0.99), "decouple": True}
    assert config.lr_scheduler_args == ("T_max=100",) and config.lr_scheduler_kwargs == {"T_max": 100}


def test_lms_sampler_needs_scipy_when_sampling() -> None:
    config = {"sample_prompts": "prompts.txt", "sample_every_n_epochs": 1, "sample_sampler": "k_lms"}
    if importlib.util.find_spec("scipy") is None:
        assert error_keys(config) == ["sample_sampler"]
    else:
        assert check(config).sample_sampler == "k_lms"
    assert check({"sample_sampler": "k_lms"}).sample_sampler == "k_lms"


# --- warnings --------------------------------------------------------------------------------------------------


def test_attention_and_memory_switches_are_warnings() -> None:
    config = check({"xformers": True, "sdpa": True, "mem_eff_attn": True, "lowram": True, "highvram": False})
    assert warning_keys(config) == ["xformers", "sdpa", "mem_eff_attn", "lowram"]
    assert check({"xformers": False}).warnings == ()


def test_clip_skip_is_ignored_on_sdxl_with_a_warning() -> None:
    assert warning_keys(check({"clip_skip": 2}, "sd_xl")) == ["clip_skip"]
    assert check({"clip_skip": 2}, "sd_1_5").warnings == ()


def test_sdxl_fp16_without_no_half_vae_warns() -> None:
    assert warning_keys(check({"mixed_precision": "fp16", "no_half_vae": False}, "sd_xl")) == ["no_half_vae"]
    assert check({"mixed_precision": "fp16"}, "sd_xl").warnings == ()


def test_other_warnings() -> None:
    assert warning_keys(check({"v_parameterization": True})) == ["v_parameterization"]
    assert warning_keys(check({"lr_warmup_steps": 10})) == ["lr_warmup_steps"]
    assert check({"lr_warmup_steps": 10, "lr_scheduler": "constant_with_warmup"}).warnings == ()
    assert warning_keys(check({"sample_every_n_epochs": 1})) == ["sample_every_n_epochs"]
    assert warning_keys(check({"sample_prompts": "p.txt"})) == ["sample_prompts"]
    assert warning_keys(check({"max_train_epochs": 4, "max_train_steps": 100})) == ["max_train_steps"]
    assert warning_keys(check({"save_n_epoch_ratio": 4, "save_every_n_epochs": 1})) == ["save_every_n_epochs"]
    assert warning_keys(check({"bucket_no_upscale": True})) == ["bucket_no_upscale"]
    assert check({"bucket_no_upscale": True, "enable_bucket": True}).warnings == ()


# --- unknown, unsupported and renamed keys ------------------------------------------------------------------


def test_unknown_key_suggests_the_nearest_known_key() -> None:
    issues = errors("learnig_rate = 1e-4\nNetwork_Dim = 8\nzzz = 1\n")
    assert [(i.key, i.line) for i in issues] == [("learnig_rate", 1), ("Network_Dim", 2), ("zzz", 3)]
    hints = [i.hint or "" for i in issues]
    assert hints[0] == "did you mean learning_rate?"
    assert "network_dim" in hints[1]
    assert "config reference" in hints[2]


def test_kohya_ss_gui_keys_in_a_flat_config_get_gui_aware_messages_not_misleading_suggestions() -> None:
    issues = errors('down_lr_weight = "1,1,1"\nlr_warmup = 10\nepoch = 3\nblock_dims = "4,4"\n')
    assert [(i.key, i.line) for i in issues] == [
        ("down_lr_weight", 1),
        ("lr_warmup", 2),
        ("epoch", 3),
        ("block_dims", 4),
    ]
    assert all("kohya_ss GUI setting" in i.message for i in issues)
    hints = [i.hint or "" for i in issues]
    assert "network_args" in hints[0] and "prior_loss_weight" not in hints[0]
    assert "percentage" in hints[1] and "lr_warmup_steps = 0.1" in hints[1]
    assert "max_train_epochs" in hints[2] and "network_args" in hints[3]


def test_a_config_with_lora_type_is_read_as_the_gui_writes_it_and_typos_still_show() -> None:
    issues = errors('learnig_rate = 1e-4\nepoch = 3\nLoRA_type = "Standard"\nzzz = 1\n')
    assert [(i.key, i.line) for i in issues] == [("learnig_rate", 1), ("zzz", 4)]
    config = check('epoch = 3\nLoRA_type = "Kohya LoCon"\nconv_dim = 4\nconv_alpha = 2\n')
    assert config.max_train_epochs == 3 and config.network_kwargs == {"conv_dim": "4", "conv_alpha": "2"}


def test_unsupported_key_says_kohya_accepts_it() -> None:
    [issue] = errors({"full_bf16": True})
    assert issue.message.startswith("kohya accepts full_bf16 but this trainer does not implement it:")
    assert "remove it" in issue.message and "bf16" in issue.message
    [issue] = errors({"in_json": "meta.json"})
    assert "train_data_dir" in issue.message


def test_unsupported_key_at_kohyas_default_is_only_a_warning() -> None:
    config = check({"face_crop_aug_range": "", "caption_separator": ",", "fp8_base": False, "vae": ""})
    assert warning_keys(config) == ["face_crop_aug_range", "caption_separator", "fp8_base", "vae"]
    assert all("changes nothing" in w.message for w in config.warnings)
    assert error_keys({"masked_loss": True}) == ["masked_loss"]


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("lion8bit", "Lion8bit"),
        ("DADAPTADAM", "DAdaptAdam"),
        ("PagedAdamW8bit", "PagedAdamW8bit"),
        ("adamwschedulefree", "AdamWScheduleFree"),
        ("RAdam", "RAdam"),
        ("torch.optim.AdamW", "torch.optim.AdamW"),
        ("pytorch_optimizer.CAME", "pytorch_optimizer.CAME"),
        ("came_pytorch.CAME", "came_pytorch.CAME"),
    ],
)
def test_kohya_optimizer_names_and_class_paths_are_accepted(given: str, kept: str) -> None:
    assert check({"optimizer_type": given, "learning_rate": 1.0}).optimizer_type == kept


def test_d_adaptation_and_schedule_free_advice() -> None:
    low = check({"optimizer_type": "DAdaptAdam", "learning_rate": 1e-4})
    assert [w.key for w in low.warnings] == ["learning_rate"] and "around 1.0" in low.warnings[0].message
    assert check({"optimizer_type": "DAdaptAdam", "learning_rate": 1.0}).warnings == ()
    assert error_keys(
        {"optimizer_type": "DAdaptSGD", "learning_rate": 1.0, "lr_scheduler": "cosine", "lr_warmup_steps": 10}
    ) == ["lr_warmup_steps"]
    free = check({"optimizer_type": "AdamWScheduleFree", "lr_scheduler": "cosine"})
    assert [w.key for w in free.warnings] == ["lr_scheduler"] and "schedule themselves" in free.warnings[
        0
    ].message


def test_scheduler_classes_and_their_rules() -> None:
    config = check({"lr_scheduler_type": "CosineAnnealingLR", "lr_scheduler_args": ["T_max=100"]})
    assert config.lr_scheduler_type == "CosineAnnealingLR" and config.warnings == ()
    assert error_keys({"lr_scheduler_type": "CosineAnnealingLR", "lr_warmup_steps": 5}) == ["lr_warmup_steps"]
    assert error_keys({"lr_scheduler_type": "os.system"}) == ["lr_scheduler_type"]
    replaced = check(
        {"lr_scheduler_type": "StepLR", "lr_scheduler": "cosine", "lr_scheduler_args": ["step_size=5"]}
    )
    assert [w.key for w in replaced.warnings] == ["lr_scheduler"]


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"adaptive_noise_scale": 0.01}, "adaptive_noise_scale"),
        ({"scale_v_pred_loss_like_noise_pred": True}, "scale_v_pred_loss_like_noise_pred"),
        ({"v_pred_like_loss": 0.1, "v_parameterization": True}, "v_pred_like_loss"),
    ],
)
def test_noise_and_loss_combinations_kohya_refuses(values: dict[str, object], key: str) -> None:
    assert key in error_keys(values)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"noise_offset_random_strength": True}, "noise_offset_random_strength"),
        ({"ip_noise_gamma_random_strength": True}, "ip_noise_gamma_random_strength"),
        ({"multires_noise_discount": 0.5}, "multires_noise_discount"),
        ({"zero_terminal_snr": True}, "zero_terminal_snr"),
        ({"huber_c": 0.3}, "huber_c"),
    ],
)
def test_noise_and_loss_settings_without_effect_are_warned(values: dict[str, object], key: str) -> None:
    assert key in warning_keys(check(values))


def test_noise_and_loss_settings_kohyas_presets_write_are_accepted_quietly() -> None:
    # the GUI writes every key, most at their "off" values
    preset = {
        "multires_noise_iterations": 8,
        "multires_noise_discount": 0.2,
        "noise_offset": 0.0357,
        "adaptive_noise_scale": 0.00357,
        "ip_noise_gamma": 0,
        "noise_offset_random_strength": False,
        "loss_type": "l2",
        "huber_schedule": "snr",
        "huber_c": 0.1,
        "scale_weight_norms": 1,
        "debiased_estimation_loss": True,
        "v_pred_like_loss": 0,
        "scale_v_pred_loss_like_noise_pred": False,
    }
    config = check(preset)
    assert config.warnings == () and config.multires_noise_iterations == 8 and config.ip_noise_gamma is None


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("AdamW9bit", "did you mean AdamW8bit"),
        ("os.system", "imported only from"),
        ("torch.nn.Linear", "torch are imported only from torch.optim"),
        ("prodigyplus.ProdigyPlusScheduleFree", "pip install prodigy-plus-schedule-free"),
    ],
)
def test_unknown_or_unsafe_optimizer_classes_are_refused(given: str, fragment: str) -> None:
    [issue] = errors({"optimizer_type": given})
    assert issue.key == "optimizer_type"
    assert fragment in f"{issue.message} {issue.hint}"


def test_aliases_are_read_under_their_new_name() -> None:
    config = check('lr_restart_cycles = 3\ncaption_extention = ".txt"\n')
    assert config.lr_scheduler_num_cycles == 3 and config.caption_extension == ".txt"
    assert [(w.key, w.line) for w in config.warnings] == [
        ("lr_scheduler_num_cycles", 1),
        ("caption_extension", 2),
    ]
    assert error_keys({"lr_restart_cycles": 3, "lr_scheduler_num_cycles": 2}) == ["lr_restart_cycles"]


# --- collecting issues, positions ---------------------------------------------------------------------------


def test_all_issues_are_collected_in_line_order() -> None:
    text = 'seed = 1\nnetwork_dim = "abc"\nv2 = true\n\nmixed_precision = "fp32"\nfull_fp16 = true\n'
    issues = errors(text)
    assert [(i.key, i.line, i.column) for i in issues] == [
        ("network_dim", 2, 1),
        ("v2", 3, 1),
        ("mixed_precision", 5, 1),
        ("full_fp16", 6, 1),
    ]
    assert issues[2].hint == "choose one of no, fp16, bf16"


def test_key_positions_inside_sections_and_json() -> None:
    [issue] = errors("[model]\nv2 = false\n\n[training]\n  network_dim = 0\n")
    assert (issue.key, issue.line, issue.column) == ("network_dim", 5, 3)
    [issue] = errors('{\n  "seed": 1,\n  "network_dim": "x"\n}')
    assert (issue.key, issue.line, issue.column) == ("network_dim", 3, 3)


def test_json_with_string_numbers_as_kohya_guis_write_them() -> None:
    source = json.dumps(
        {
            "learning_rate": "1e-4",
            "network_dim": "32",
            "network_alpha": "16",
            "clip_skip": "2",
            "resolution": "512,768",
            "lr_warmup_steps": "0.1",
            "max_train_epochs": "",
            "save_every_n_epochs": "1",
            "cache_latents": "true",
            "optimizer_args": "weight_decay=0.01",
            "lr_scheduler_args": "",
            "seed": "1234",
        },
        indent=2,
    )
    config = check(source)
    assert config.learning_rate == 1e-4 and config.network_dim == 32 and config.network_alpha == 16.0
    assert config.clip_skip == 2 and config.resolution == (512, 768) and config.lr_warmup_steps == 0.1
    assert config.max_train_epochs is None and config.save_every_n_epochs == 1
    assert config.cache_latents is True and config.optimizer_args == ("weight_decay=0.01",)
    assert config.seed == 1234 and config.lr_scheduler_args == ()


def test_sectioned_aws_style_config_validates_for_both_fm_types(tmp_path: Path) -> None:
    (tmp_path / "data" / "20_cat").mkdir(parents=True)
    (tmp_path / "base.safetensors").write_bytes(b"x")
    text = (
        "[model]\nv2 = false\nv_parameterization = false\n"
        f'pretrained_model_name_or_path = "{(tmp_path / "base.safetensors").as_posix()}"\n'
        f'[dataset]\ntrain_data_dir = "{(tmp_path / "data").as_posix()}"\nreg_data_dir = ""\n'
        "prior_loss_weight = 1\ncache_latents = true\nshuffle_caption = true\nenable_bucket = true\n"
        '[additional_network]\nnetwork_dim = 32\nnetwork_alpha = 16\nnetwork_module = "networks.lora"\n'
        "network_args = []\n"
        '[optimizer]\nunet_lr = 1e-4\ntext_encoder_lr = 1e-5\noptimizer_type = "AdamW8bit"\n'
        'lr_scheduler = "cosine_with_restarts"\nlr_warmup_steps = 0\nlr_restart_cycles = 1\n'
        '[training]\nresolution = "512,512"\nmax_train_epochs = 10\nnoise_offset = 0.0\nxformers = true\n'
        'lowram = false\nclip_skip = 2\nmixed_precision = "fp16"\nsave_precision = "fp16"\n'
        '[saving]\noutput_name = "aws_lora"\nsave_every_n_epochs = 1\nsave_n_epoch_ratio = 0\n'
        'save_last_n_epochs = 499\nsave_model_as = "safetensors"\n'
        f'output_dir = "{(tmp_path / "out").as_posix()}"\nlogging_dir = "./logs"\nlog_prefix = "aws_lora"\n'
        '[others]\nmin_bucket_reso = 256\nmax_bucket_reso = 1024\ncaption_extension = ".txt"\n'
        "max_token_length = 225\nseed = 1337\n"
    )
    sd15 = validate_config(text, "sd_1_5", cuda_available=True)
    assert warning_keys(sd15) == ["lr_scheduler_num_cycles", "xformers"]
    assert sd15.reg_data_dir is None and sd15.noise_offset is None and sd15.save_n_epoch_ratio is None
    assert sd15.prior_loss_weight == 1.0 and sd15.network_alpha == 16.0
    sdxl = validate_config(text, "sd_xl", cuda_available=True)
    assert warning_keys(sdxl) == ["lr_scheduler_num_cycles", "xformers", "clip_skip"]
    assert sdxl.resolution == (512, 512) and sdxl.no_half_vae is True


# --- paths ------------------------------------------------------------------------------------------------------


def test_required_paths() -> None:
    issues = errors({}, require_paths=True)
    assert sorted(str(i.key) for i in issues) == [
        "output_dir",
        "pretrained_model_name_or_path",
        "train_data_dir",
    ]
    assert check({}, require_paths=False)


def test_paths_must_exist_with_the_right_kind(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    data = tmp_path / "data"
    data.mkdir()
    good = {
        "pretrained_model_name_or_path": str(model),
        "train_data_dir": str(data),
        "output_dir": str(tmp_path / "o"),
    }
    assert check(good, require_paths=True, check_paths_exist=True).train_data_dir == str(data)
    bad = {
        **good,
        "pretrained_model_name_or_path": str(tmp_path / "missing.safetensors"),
        "train_data_dir": str(model),
        "network_weights": str(data),
        "output_dir": str(model),
    }
    issues = errors(bad, require_paths=True, check_paths_exist=True)
    assert [(i.key, i.message.split(" ", 1)[1]) for i in issues] == [
        ("pretrained_model_name_or_path", "does not exist"),
        ("train_data_dir", "is not a folder"),
        ("network_weights", "is not a file"),
        ("output_dir", "exists and is not a folder"),
    ]
    assert check(bad, check_paths_exist=False)


def test_a_path_the_file_system_cannot_look_up_is_an_issue_not_a_traceback(tmp_path: Path) -> None:
    # The CLI checks paths where they are (no confinement): a name longer than a file system holds raised
    # ENAMETOOLONG out of Path.exists.
    long = str(tmp_path / ("p" * 300))
    issues = errors(
        {"sample_prompts": long + ".txt", "output_dir": long, "train_data_dir": str(tmp_path)},
        check_paths_exist=True,
    )
    assert sorted(str(i.key) for i in issues) == ["output_dir", "sample_prompts"]
    by_key = {i.key: i for i in issues}
    assert "cannot be looked up" in by_key["sample_prompts"].message
    assert "File name too long" in by_key["sample_prompts"].message and "255" in (
        by_key["sample_prompts"].hint or ""
    )
    assert "cannot be looked up" in by_key["output_dir"].message


# --- TrainConfig ------------------------------------------------------------------------------------------------


def test_train_config_helpers() -> None:
    config = check(
        {
            "learning_rate": 1e-3,
            "unet_lr": 2e-4,
            "resolution": "640,512",
            "lr_warmup_steps": 0.1,
            "lr_scheduler": "cosine",
            "max_train_epochs": 5,
            "save_n_epoch_ratio": 2,
        }
    )
    assert config.resolution == (640, 512)
    assert config.effective_unet_lr == 2e-4 and config.effective_text_encoder_lr == 1e-3
    assert (config.unet_lr, config.text_encoder_lr) == (2e-4, None)  # the values as written
    assert config.lr_warmup_steps_for(250) == 25
    assert config.save_every_n_epochs_for(5) == 2
    assert config.seed is None and config.output_stem == "last"
    assert config.state_dir == Path("last-state") and config.prediction_type == "epsilon"
    with pytest.raises(FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]
    plain = check(
        {"lr_warmup_steps": 7, "lr_scheduler": "linear", "save_every_n_epochs": 3, "max_train_steps": 90}
    )
    assert plain.lr_warmup_steps_for(1000) == 7
    assert plain.save_every_n_epochs_for(10) == 3 and check({}).save_every_n_epochs_for(10) is None
    named = check({"output_name": "mine", "output_dir": "out", "v_parameterization": True})
    assert named.state_dir == Path("out") / "mine-state" and named.prediction_type == "v_prediction"
    assert check({"clip_skip": 2}).effective_clip_skip == 2
    assert check({"clip_skip": 2}, "sd_xl").effective_clip_skip == 1  # SDXL ignores it, as kohya does


def test_to_dict_and_parsed_config_round_trip() -> None:
    config = check({"resolution": "768,512", "network_args": ["conv_dim=4"], "seed": 3}, "sd_xl")
    plain = config.to_dict()
    assert plain["resolution"] == "768,512" and plain["seed"] == 3 and plain["network_args"] == ["conv_dim=4"]
    json.dumps(plain)
    assert check(plain, "sd_xl") == config
    assert check(dict(config.values), "sd_xl") == config
    assert check(parse_config("seed = 3\n")).seed == 3


def test_unknown_fm_type() -> None:
    assert error_keys({}, "sd_3") == ["fm_type"]


def test_values_kohya_accepts_are_read_with_kohyas_meaning() -> None:
    config = check(
        {
            "vae_batch_size": 0,  # kohya flushes a latent batch at >= 0 images: one at a time
            "xformers": "xformers",  # kohya_ss writes its attention choice as text
            "resume": False,  # sd-scripts' `if not args.resume`
            "sample_every_n_epochs": 999999,  # "never", as Linaqruf's notebooks write it
            "dynamo_backend": "no",  # only read with torch_compile
            "save_last_n_steps_state": 1,  # only read with save_state
            "optimizer_args": '"weight_decay=0.1" "betas=0.9,0.99"',  # the GUI's one-string form
        }
    )
    assert config.vae_batch_size == 1 and config.xformers is True and config.resume is None
    assert config.sample_every_n_epochs == 999999
    assert config.optimizer_kwargs == {"weight_decay": 0.1, "betas": (0.9, 0.99)}
    by_key = {w.key: w.message for w in config.warnings}
    assert "torch.compile, which is off" in by_key["dynamo_backend"]
    assert "save_state, which is off" in by_key["save_last_n_steps_state"]
    assert error_keys({"dynamo_backend": "eager", "torch_compile": True}) == [
        "dynamo_backend",
        "torch_compile",
    ]


def test_text_switches_are_on_as_in_sd_scripts_and_a_false_looking_one_is_flagged() -> None:
    config = check({"cache_latents": "false", "shuffle_caption": "true", "flip_aug": ""})
    assert config.cache_latents is True and config.shuffle_caption is True and config.flip_aug is False
    [warning] = config.warnings
    assert warning.key == "cache_latents" and "sd-scripts reads as true" in warning.message
    assert "cache_latents = false" in (warning.hint or "")


def test_resolution_off_the_8_pixel_grid_is_a_warning_without_buckets_only() -> None:
    config = check({"resolution": "512,650"})
    assert config.resolution == (512, 650) and warning_keys(config) == ["resolution"]
    config = check({"resolution": "512,650", "enable_bucket": True, "max_bucket_reso": 1024})
    assert warning_keys(config) == []
