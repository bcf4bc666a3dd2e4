"""Named presets and the import of a kohya_ss GUI preset (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomlkit

from kohya_backend.config.parse import parse_config
from kohya_backend.errors import TrainManagementError
from kohya_backend.service.presets import MAX_TEXT_BYTES, PresetStore, import_kohya_ss

# Keys as the kohya_ss GUI (v24) writes them to a LoRA preset.
KOHYA_SS = {
    "LoRA_type": "LyCORIS/LoKr",
    "adaptive_noise_scale": 0,
    "bucket_no_upscale": True,
    "bucket_reso_steps": 64,
    "cache_latents": True,
    "caption_extension": ".txt",
    "clip_skip": "2",
    "epoch": 10,
    "full_fp16": False,
    "learning_rate": 0.0001,
    "logging_dir": "/home/me/log",
    "lr_scheduler": "cosine",
    "max_resolution": "512,512",
    "max_token_length": "150",
    "max_train_epochs": "",
    "mixed_precision": "bf16",
    "network_alpha": 16,
    "network_dim": 32,
    "optimizer": "AdamW8bit",
    "output_dir": "/home/me/out",
    "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
    "reg_data_dir": "",
    "save_precision": "fp16",
    "seed": "1234",
    "text_encoder_lr": 0,
    "max_train_steps": 0,
    "train_batch_size": 2,
    "unet_lr": 0.0001,
    "xformers": "xformers",
    "full_bf16": True,
}


def test_presets_save_load_list_and_delete(tmp_path: Path) -> None:
    store = PresetStore(tmp_path)
    assert store.names() == []
    store.save("portrait sdxl", "network_dim = 16\n", "sd_xl")
    store.save("quick", "max_train_steps = 10\n")
    assert store.names() == ["portrait sdxl", "quick"]
    loaded = store.load("portrait sdxl")
    assert (loaded.name, loaded.fm_type, loaded.text) == ("portrait sdxl", "sd_xl", "network_dim = 16\n")
    assert store.load("quick").fm_type is None
    store.save("quick", "max_train_steps = 20\n")  # replaced
    assert store.load("quick").text == "max_train_steps = 20\n"
    assert (tmp_path / "presets" / "quick.toml").read_text() == "max_train_steps = 20\n"
    store.delete("quick")
    assert store.names() == ["portrait sdxl"]
    with pytest.raises(TrainManagementError, match="there is no preset 'quick'") as missing:
        store.load("quick")
    assert "portrait sdxl" in (missing.value.hint or "")
    with pytest.raises(TrainManagementError, match="not a safe folder name"):
        store.save("../escape", "x = 1\n")
    with pytest.raises(TrainManagementError, match="more than 256 KiB"):
        store.save("big", "#" * (MAX_TEXT_BYTES + 1))
    assert not (tmp_path / "escape.toml").exists() and store.names() == ["portrait sdxl"]


def test_a_kohya_ss_preset_imports_what_kohya_ss_passes_to_sd_scripts() -> None:
    result = import_kohya_ss(json.dumps(KOHYA_SS))
    values = tomlkit.parse(result.toml)
    # read as the GUI passes it to sd-scripts: LoRA_type -> network_module and network_args, optimizer ->
    # optimizer_type, epoch -> max_train_epochs (and the cycles), max_resolution -> resolution, lr_warmup's 10 % ->
    # 0.1, text_encoder_lr 0 -> network_train_unet_only, and what is 0 for unset left out
    assert values.unwrap() == {
        "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "caption_extension": ".txt",
        "clip_skip": 2, "learning_rate": 0.0001, "lr_scheduler": "cosine", "lr_scheduler_num_cycles": 10,
        "lr_warmup_steps": 0.1, "max_data_loader_n_workers": 0, "max_token_length": 150, "max_train_epochs": 10,
        "mixed_precision": "bf16", "network_alpha": 16.0, "network_dim": 32, "network_module": "lycoris.kohya",
        "network_args": [
            "preset=full", "conv_dim=1", "conv_alpha=1", "use_tucker=False", "rank_dropout=0", "bypass_mode=False",
            "dora_wd=False", "module_dropout=0.0", "factor=-1", "use_cp=False", "use_scalar=False",
            "decompose_both=False", "rank_dropout_scale=False", "algo=lokr", "train_norm=False",
        ],
        "network_train_unet_only": True, "optimizer_type": "AdamW8bit", "resolution": "512,512",
        "save_precision": "fp16", "seed": 1234, "train_batch_size": 2, "unet_lr": 0.0001, "xformers": True,
    }  # fmt: skip
    assert sorted(result.imported) == sorted(values)
    parse_config(result.toml)  # the imported config parses as it is
    reasons = result.not_imported
    assert set(reasons) == {"logging_dir", "output_dir", "pretrained_model_name_or_path", "full_bf16"}
    assert "set by the tab" in reasons["pretrained_model_name_or_path"]
    assert "path on the machine that saved the preset" in reasons["logging_dir"]
    assert "not implemented" in reasons["full_bf16"]
    assert result.fm_type == "sd_1_5" and "LoRA_type, epoch" in result.notes[0]


def test_a_kohya_ss_preset_is_read_as_the_gui_reads_it() -> None:
    # the GUI writes the attention as a choice: "none" is off, "sdpa" is not xformers
    for attention, expected in (("none", {}), ("sdpa", {"sdpa": True}), ("xformers", {"xformers": True})):
        values = tomlkit.parse(import_kohya_ss(json.dumps(KOHYA_SS | {"xformers": attention})).toml)
        assert {k: values[k] for k in ("xformers", "sdpa") if k in values} == expected, attention
    lycoris = import_kohya_ss(
        json.dumps(KOHYA_SS | {"LoRA_type": "LyCORIS/LoHa", "sdxl": True, "conv_dim": 4})
    )
    values = tomlkit.parse(lycoris.toml)
    assert values["network_module"] == "lycoris.kohya" and "algo=loha" in values["network_args"]
    assert lycoris.fm_type == "sd_xl"
    with pytest.raises(TrainManagementError, match="Flux"):
        import_kohya_ss(json.dumps(KOHYA_SS | {"flux1_checkbox": True}))


def test_kohya_ss_names_give_way_to_the_sd_scripts_keys_they_stand_for() -> None:
    steps = import_kohya_ss(json.dumps({"epoch": 10, "max_train_steps": 1600, "xformers": "sdpa", "seed": 0}))
    assert tomlkit.parse(steps.toml).unwrap() == {"max_train_steps": 1600, "sdpa": True}  # seed 0: random
    assert "max_train_steps or max_train_epochs sets the length" in steps.not_imported["epoch"]
    epochs = import_kohya_ss(json.dumps({"epoch": 10, "max_train_epochs": 4, "xformers": "none"}))
    assert tomlkit.parse(epochs.toml).unwrap() == {"max_train_epochs": 4} and set(epochs.not_imported) == {
        "epoch"
    }
    both = import_kohya_ss(json.dumps({"optimizer": "Lion", "optimizer_type": "AdamW", "unet_lr": 0.0}))
    assert (
        tomlkit.parse(both.toml).unwrap() == {"optimizer_type": "AdamW"} and "optimizer" in both.not_imported
    )


def test_a_preset_that_is_not_a_json_object_is_refused_with_where() -> None:
    with pytest.raises(TrainManagementError, match="line 2, column 1"):
        import_kohya_ss('{"network_dim": 8,\n}')
    with pytest.raises(TrainManagementError, match="not a JSON object"):
        import_kohya_ss("[1, 2]")
