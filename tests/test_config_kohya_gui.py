"""kohya_ss GUI configs are read the way the GUI builds its sd-scripts config (kohya_gui/lora_gui.py train_model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kohya_backend.config.kohya_gui import is_gui_config, translate_gui_config
from kohya_backend.config.parse import parse_config
from kohya_backend.config.validate import validate_config
from kohya_backend.errors import ConfigError

REAL = Path(__file__).parent / "data" / "real-configs"


def gui(name: str) -> dict[str, Any]:
    return dict(json.loads((REAL / "kohya_ss" / name).read_text(encoding="utf-8")))


def locon() -> dict[str, Any]:
    """kohya_ss's test/config/locon-AdamW.json without scale_weight_norms (a training feature of another branch)."""
    return {**gui("test-sd15-kohya-locon-adamw.json"), "scale_weight_norms": 0}


def check(source: Any, fm_type: str = "sd_1_5", **kwargs: Any):
    return validate_config(
        source, fm_type, cuda_available=True, require_paths=False, check_paths_exist=False, **kwargs
    )


def test_gui_configs_are_told_apart_from_sd_scripts_configs() -> None:
    assert is_gui_config(gui("test-sd15-kohya-locon-adamw.json"))
    assert is_gui_config({"epoch": 2, "max_resolution": "512,512", "optimizer": "AdamW"})
    assert not is_gui_config({"epoch": 2, "optimizer_type": "AdamW", "resolution": "512,512"})
    assert not is_gui_config({"network_dim": 8, "max_train_epochs": 2})


def test_lycoris_loha_preset_gives_the_network_args_the_gui_passes() -> None:
    values = translate_gui_config(gui("preset-sd15-loha.json")).values
    assert values["network_module"] == "lycoris.kohya"
    # the GUI's f-string for LyCORIS/LoHa, split on spaces (use_tucker appears twice there too)
    assert values["network_args"] == [
        "preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=False", "rank_dropout=0",
        "bypass_mode=False", "dora_wd=False", "module_dropout=0", "use_tucker=False", "use_scalar=False",
        "rank_dropout_scale=False", "algo=loha", "train_norm=False",
    ]  # fmt: skip
    # multires noise goes on only with noise_offset_type = "Multires"; noise_offset is then left out
    assert values["multires_noise_iterations"] == 8 and values["multires_noise_discount"] == 0.2
    assert "noise_offset" not in values and "adaptive_noise_scale" not in values


@pytest.mark.parametrize(
    ("lora_type", "module", "args"),
    [
        ("Standard", "networks.lora", ["rank_dropout=0.1", "module_dropout=0.1"]),
        (
            "Kohya LoCon",
            "networks.lora",
            ["conv_dim=16", "conv_alpha=8", "rank_dropout=0.1", "module_dropout=0.1"],
        ),
        ("LoRA-FA", "networks.lora_fa", ["rank_dropout=0.1", "module_dropout=0.1"]),
        (
            "Kohya DyLoRA",
            "networks.dylora",
            ["conv_dim=16", "conv_alpha=8", "unit=1", "rank_dropout=0.1", "module_dropout=0.1"],
        ),
        (
            "LyCORIS/iA3",
            "lycoris.kohya",
            ["preset=full", "conv_dim=16", "conv_alpha=8", "train_on_input=False", "algo=ia3"],
        ),
    ],
)
def test_lora_type_chooses_module_and_arguments(lora_type: str, module: str, args: list[str]) -> None:
    data = {**gui("test-sd15-kohya-locon-adamw.json"), "LoRA_type": lora_type}
    values = translate_gui_config(data).values
    assert (values["network_module"], values["network_args"]) == (module, args)


def test_steps_warmup_learning_rates_and_attention_as_the_gui_passes_them() -> None:
    base = locon()
    values = translate_gui_config({**base, "epoch": 3, "lr_warmup": 10}).values
    # no max_train_steps/epochs: the GUI derives the run from `epoch`; lr_warmup is a percentage -> a fraction
    assert values["max_train_epochs"] == 3 and "max_train_steps" not in values
    assert values["lr_warmup_steps"] == pytest.approx(0.1)
    assert values["lr_scheduler_num_cycles"] == 3  # "" -> the epoch count, as the GUI does
    values = translate_gui_config(
        {**base, "lr_warmup": 10, "lr_warmup_steps": 25, "max_train_steps": 500}
    ).values
    assert values["lr_warmup_steps"] == 25 and values["max_train_steps"] == 500
    assert values["xformers"] is True and "sdpa" not in values  # "xformers" -> --xformers
    assert translate_gui_config({**base, "xformers": "sdpa"}).values["sdpa"] is True
    # text_encoder_lr 0: the GUI trains the U-Net only and leaves the TE rate out
    values = translate_gui_config({**base, "text_encoder_lr": 0, "unet_lr": 0.0002}).values
    assert values["network_train_unet_only"] is True and "text_encoder_lr" not in values
    values = translate_gui_config({**base, "text_encoder_lr": 0.0001, "unet_lr": 0}).values
    assert values["network_train_text_encoder_only"] is True and "unet_lr" not in values


def test_values_the_gui_drops_fall_back_to_sd_scripts_defaults() -> None:
    base = locon()
    values = translate_gui_config({**base, "max_grad_norm": 0, "prior_loss_weight": 0, "seed": ""}).values
    # the GUI filters "", False, None and 0 out of what it writes
    assert "max_grad_norm" not in values and "prior_loss_weight" not in values and "seed" not in values
    config = check(json.dumps({**base, "max_grad_norm": 0}))
    assert config.max_grad_norm == 1.0  # so sd-scripts clips at its default 1.0


def test_optimizer_args_and_additional_parameters_as_the_gui_splits_them() -> None:
    base = locon()
    data = {**base, "optimizer_args": '"weight_decay=0.1" "betas=0.9,0.99"', "additional_parameters": ""}
    config = check(json.dumps(data))
    assert config.optimizer_args == ("weight_decay=0.1", "betas=0.9,0.99")
    assert config.optimizer_kwargs == {"weight_decay": 0.1, "betas": (0.9, 0.99)}
    extra = '--max_grad_norm=0 --network_train_unet_only --lr_scheduler_args "T_max=1000" "eta_min=0e-0"'
    values = translate_gui_config({**base, "additional_parameters": extra}).values
    assert values["max_grad_norm"] == "0" and values["network_train_unet_only"] is True
    assert values["lr_scheduler_args"] == ["T_max=1000", "eta_min=0e-0"]


def test_gui_only_keys_are_dropped_with_one_note_and_positions_follow_the_gui_keys() -> None:
    text = json.dumps(locon(), indent=2)
    parsed = parse_config(text)
    assert parsed.source_format == "kohya_ss" and parsed.gui_fm_type == "sd_1_5"
    assert "model_list" not in parsed.values and "LoRA_type" not in parsed.values
    lines = text.splitlines()
    line, _ = parsed.position("optimizer_type")
    assert '"optimizer"' in lines[line - 1]  # reported where the GUI key was written
    config = check(parsed)
    notes = [w for w in config.warnings if "kohya_ss GUI config" in w.message]
    assert len(notes) == 1 and "LoRA_type" in notes[0].message and "optimizer_type" not in notes[0].message
    assert config.optimizer_type == "AdamW" and config.resolution == (512, 512)


def test_a_typo_in_a_gui_config_is_still_reported() -> None:
    data = {**locon(), "learnig_rate": 1e-4}
    with pytest.raises(ConfigError) as info:
        check(json.dumps(data))
    assert [i.key for i in info.value.issues] == ["learnig_rate"]


def test_the_sdxl_checkbox_must_match_the_fm_type() -> None:
    text = (REAL / "kohya_ss" / "test-sdxl-standard-adafactor.json").read_text(encoding="utf-8")
    assert check(text, "sd_xl").no_half_vae is True
    with pytest.raises(ConfigError) as info:
        check(text, "sd_1_5")
    [issue] = [i for i in info.value.issues if "saved for SDXL" in i.message]
    assert "sd_xl" in (issue.hint or "")


def test_stop_text_encoder_training_and_sample_prompt_text_are_noted() -> None:
    data = {**locon(), "stop_text_encoder_training": 20}
    config = check(json.dumps(data))
    messages = " ".join(w.message for w in config.warnings)
    assert "stop_text_encoder_training is ignored" in messages
    assert "sample prompt text" in messages and config.sample_prompts is None


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"flux1_checkbox": True}, "Flux.1"),
        ({"LoRA_type": "Flux1"}, "Flux.1"),
        ({"sd3_checkbox": True}, "SD3"),
    ],
)
def test_other_model_families_of_the_gui_are_refused_in_one_sentence(
    change: dict[str, Any], what: str
) -> None:
    data = {**gui("test-sd15-kohya-locon-adamw.json"), **change}
    with pytest.raises(ConfigError) as info:
        check(json.dumps(data))
    [issue] = info.value.issues
    assert what in issue.message and issue.message.endswith("SD 1.5 and SDXL only.")
