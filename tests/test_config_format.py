"""Canonical TOML (stable order, groups, round trip) and the Markdown config reference."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import tomlkit

from kohya_backend.config.format import FormatResult, format_config, reference_markdown, to_canonical_toml
from kohya_backend.config.schema import ALIASES, FM_TYPES, GROUPS, SCHEMA, UNSUPPORTED, template_toml
from kohya_backend.config.validate import TrainConfig, validate_config


def _validate(source: str | dict[str, Any], fm_type: str) -> TrainConfig:
    return validate_config(source, fm_type, cuda_available=True, require_paths=False, check_paths_exist=False)


RICH = {
    "pretrained_model_name_or_path": "C:\\models\\base model.safetensors",
    "train_data_dir": "/data/train",
    "output_name": "my lora",
    "resolution": "768,512",
    "enable_bucket": True,
    "network_dim": "16",
    "network_alpha": 8,
    "network_args": ["conv_dim=4", "conv_alpha=2"],
    "optimizer_args": ["weight_decay=0.01", "betas=(0.9,0.99)"],
    "learning_rate": "1e-4",
    "text_encoder_lr": 1e-05,
    "lr_scheduler": "cosine_with_restarts",
    "lr_warmup_steps": "0.05",
    "lr_scheduler_num_cycles": 3,
    "max_train_epochs": 7,
    "caption_prefix": 'a "quoted" prefix, ',
    "training_comment": "line one\nline two",
    "noise_offset": 0.0357,
    "min_snr_gamma": 5,
    "seed": 0,
    "save_every_n_epochs": 2,
    "save_last_n_epochs": 2,
    "sample_prompts": "prompts.txt",
    "sample_every_n_steps": 50,
    "sample_sampler": "euler_a",
}


def _sources() -> list[tuple[str | dict[str, Any], str]]:
    sources: list[tuple[str | dict[str, Any], str]] = [(RICH, fm) for fm in FM_TYPES]
    return [*sources, *((template_toml(fm), fm) for fm in FM_TYPES), ({}, "sd_1_5")]


@pytest.mark.parametrize(("source", "fm_type"), _sources())
@pytest.mark.parametrize("include_defaults", [True, False])
def test_canonical_toml_round_trips(
    source: str | dict[str, Any], fm_type: str, include_defaults: bool
) -> None:
    config = _validate(source, fm_type)
    text = to_canonical_toml(config, include_defaults=include_defaults)
    again = _validate(text, fm_type)
    assert again == config
    assert to_canonical_toml(again, include_defaults=include_defaults) == text


def test_canonical_order_does_not_depend_on_input_order() -> None:
    items = list(RICH.items())
    random.Random(7).shuffle(items)
    assert to_canonical_toml(_validate(dict(items), "sd_1_5")) == to_canonical_toml(_validate(RICH, "sd_1_5"))


def test_canonical_layout_is_flat_grouped_and_in_schema_order() -> None:
    text = to_canonical_toml(_validate(RICH, "sd_xl"))
    lines = text.splitlines()
    keys = [line.split(" = ")[0] for line in lines if " = " in line and not line.startswith("#")]
    assert keys == [k for k in SCHEMA if k in keys]
    comments = [line[2:] for line in lines if line.startswith("# ")]
    assert comments == [title for _, title in GROUPS]
    assert not any(line.startswith("[") for line in lines)
    data = tomlkit.parse(text).unwrap()
    assert data["resolution"] == "768,512" and data["network_args"] == ["conv_dim=4", "conv_alpha=2"]
    assert data["pretrained_model_name_or_path"] == "C:\\models\\base model.safetensors"
    assert "seed" in data and data["seed"] == 0
    assert "unet_lr" not in data and "clip_skip" not in data  # unset values are left out


def test_without_defaults_only_changed_keys_are_written() -> None:
    config = _validate({"network_dim": 8, "seed": 42, "no_half_vae": True}, "sd_xl")
    data = tomlkit.parse(to_canonical_toml(config, include_defaults=False)).unwrap()
    assert data == {"network_dim": 8, "seed": 42}
    assert tomlkit.parse(to_canonical_toml(_validate({}, "sd_1_5"), include_defaults=False)).unwrap() == {}


def test_format_config_returns_toml_config_and_warnings() -> None:
    result = format_config(
        "[training]\nxformers = true\nlr_restart_cycles = 2\n", "sd_1_5", require_paths=False
    )
    assert isinstance(result, FormatResult)
    assert [w.key for w in result.warnings] == ["xformers", "lr_scheduler_num_cycles"]
    data = tomlkit.parse(result.toml).unwrap()
    assert data["lr_scheduler_num_cycles"] == 2 and "lr_restart_cycles" not in data
    assert result.config.lr_scheduler_num_cycles == 2
    formatted_again = format_config(result.toml, "sd_1_5", require_paths=False)
    assert formatted_again.toml == result.toml
    assert [w.key for w in formatted_again.warnings] == ["xformers"]


def test_format_config_accepts_json() -> None:
    result = format_config(json.dumps({"network_dim": "32", "clip_skip": "2"}), "sd_1_5", require_paths=False)
    data = tomlkit.parse(result.toml).unwrap()
    assert data["network_dim"] == 32 and data["clip_skip"] == 2


def _table_rows(markdown: str) -> list[list[str]]:
    rows = []
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.replace("\\|", "\0").strip("|").split("|")]
            rows.append([c.replace("\0", "|") for c in cells])
    return rows


def test_reference_lists_every_key_with_its_details() -> None:
    markdown = reference_markdown()
    rows = _table_rows(markdown)
    by_key = {row[0].strip("`"): row for row in rows}
    assert set(SCHEMA) <= set(by_key) and set(UNSUPPORTED) <= set(by_key) and set(ALIASES) <= set(by_key)
    assert len(rows) == len(SCHEMA) + len(UNSUPPORTED) + len(ALIASES)
    for key, spec in SCHEMA.items():
        assert len(by_key[key]) == 6, key
        status = by_key[key][5]
        kind = spec.effect.kind
        assert status.startswith(
            {"used": "implemented", "compat": "accepted, no effect", "fixed": "only"}[kind]
        )
    assert by_key["xformers"][5].endswith('warns: "xformers is accepted for kohya compatibility, but this trainer '
                                          'always uses PyTorch scaled-dot-product attention"')  # fmt: skip
    assert by_key["resolution"][2] == '`"512,512"` / `"1024,1024"`'
    assert by_key["no_half_vae"][2] == "`false` / `true`"
    assert by_key["network_dim"][2] == "`4`" and by_key["network_dim"][3] == "≥ 1"
    assert by_key["learning_rate"][3] == "> 0"
    assert "`AdamW8bit`" in by_key["optimizer_type"][3]
    assert by_key["max_token_length"][3] == "`75`, `150`, `225`"
    assert by_key["network_args"][3].startswith(
        "`conv_dim=`, `conv_alpha=`, `rank_dropout=`, `module_dropout=` (networks.lora)"
    )
    assert "a class path" in by_key["optimizer_type"][3]
    assert by_key["seed"][2] == "unset"
    assert by_key["full_fp16"][1].startswith("pure half-precision")
    for _, title in GROUPS:
        assert f"## {title}" in markdown
