"""Metadata parity: our LoRA metadata has every key sd-scripts writes, each in the kind it writes, and the WebUI's Lora
readers (AUTOMATIC1111 1.10 and Forge: extensions-builtin/Lora network.py and ui_edit_user_metadata.py) read it.

The readers' logic is reproduced here in a few lines each (what they parse and how), since the WebUI is not
installed in the test environment.
"""

from __future__ import annotations

import contextlib
import datetime
import html
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from kohya_backend.config.validate import validate_config
from kohya_backend.lora.metadata import BaseModel, DatasetInfo, NetworkSettings, training_metadata
from kohya_backend.lora.save import load_lora, save_lora
from kohya_backend.train.optim import optimizer_description

SAMPLE = json.loads(
    (Path(__file__).parent / "data" / "kohya-metadata" / "sd15-lora-train_data_dir.json").read_text(
        encoding="utf-8"
    )
)
_INT = re.compile(r"-?\d+")


def kind(value: str) -> str:
    """The kind of a metadata value as sd-scripts' str() makes it."""
    if value in ("None", "null"):
        return value
    if value in ("True", "False"):
        return "bool"
    if _INT.fullmatch(value):
        return "int"
    try:
        float(value)
        return "float"
    except ValueError:
        pass
    if value.startswith("{"):
        return "json-object"
    if value.startswith("("):
        return "tuple"
    return "text"


def ours(**overrides: Any) -> dict[str, str]:
    """Our metadata for the run the sample describes (same settings, our own values); an override of None unsets."""
    values = {
        "learning_rate": 1e-4,
        "unet_lr": 1e-4,
        "text_encoder_lr": 5e-5,
        "network_dim": 32,
        "network_alpha": 16,
        "network_args": ["conv_dim=4", "conv_alpha=1"],
        "lr_scheduler": "cosine_with_restarts",
        "mixed_precision": "fp16",
        "clip_skip": 2,
        "max_token_length": 225,
        "cache_latents": True,
        "seed": 42,
        "shuffle_caption": True,
        "enable_bucket": True,
        "train_batch_size": 2,
        "max_train_epochs": 10,
        "output_name": "sample",
    }
    values = {k: v for k, v in {**values, **overrides}.items() if v is not None}
    config = validate_config(
        values, "sd_1_5", require_paths=False, check_paths_exist=False, cuda_available=True
    )
    return training_metadata(
        config=config,
        network=NetworkSettings(
            dim=config.network_dim,
            alpha=config.network_alpha,
            conv_dim=config.conv_dim,
            conv_alpha=config.conv_alpha,
            given_args=config.network_kwargs,
        ),
        optimizer=optimizer_description(torch.optim.AdamW, {"weight_decay": 0.01, "betas": (0.9, 0.99)}),
        session_id=123456789,
        started_at=1_700_000_000.5,
        finished_at=1_700_003_600.5,
        steps=400,
        epoch=10,
        max_train_steps=400,
        num_epochs=10,
        num_batches_per_epoch=40,
        num_train_images=80,
        num_reg_images=0,
        dataset=DatasetInfo(
            tag_frequency={"10_demo": {"demo": 8}},
            dataset_dirs={"10_demo": {"n_repeats": 10, "img_count": 8}},
            reg_dataset_dirs={},
            bucket_info={
                "buckets": {"5": {"resolution": [512, 512], "count": 80}},
                "mean_img_ar_error": 0.0,
            },
        ),
        base_model=BaseModel(Path("/models/v1-5-pruned-emaonly.safetensors"), "ab" * 32, "1234abcd"),
    )


def saved(tmp_path: Path, metadata: dict[str, str]) -> dict[str, str]:
    path = save_lora(
        tmp_path / "x.safetensors", {"lora_unet_a.alpha": torch.tensor(4.0)}, metadata, save_precision="fp16"
    )
    return load_lora(path)[1]


def test_every_key_sd_scripts_writes_in_the_kind_it_writes(tmp_path: Path) -> None:
    metadata = saved(tmp_path, ours())
    assert sorted(set(SAMPLE) - set(metadata)) == []
    assert sorted(set(metadata) - set(SAMPLE)) == []
    mismatched = {
        k: (kind(metadata[k]), kind(SAMPLE[k])) for k in SAMPLE if kind(metadata[k]) != kind(SAMPLE[k])
    }
    assert mismatched == {}
    assert metadata["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    assert (metadata["ss_network_alpha"], metadata["ss_session_id"]) == ("16.0", "123456789")
    bucket = json.loads(metadata["ss_bucket_info"])
    assert set(bucket) == {"buckets", "mean_img_ar_error"} and bucket["buckets"]["5"]["resolution"] == [
        512,
        512,
    ]


def test_unset_values_read_none_and_switches_true_false_as_sd_scripts_writes_them() -> None:
    metadata = ours(seed=None, clip_skip=None, unet_lr=None, text_encoder_lr=None, network_args=None)
    assert (metadata["ss_seed"], metadata["ss_clip_skip"], metadata["ss_unet_lr"]) == ("None", "None", "None")
    assert "ss_network_args" not in metadata and "modelspec.encoder_layer" not in metadata
    assert metadata["ss_text_encoder_lr"] == "None"
    assert ours(text_encoder_lr=[1e-5, 1e-5])["ss_text_encoder_lr"] == "1e-05"  # the same rate per encoder
    assert ours(min_timestep=100)["modelspec.timestep_range"] == "100,1000"


# ---- the WebUI's readers, reproduced -------------------------------------------------------------------------
def webui_read_metadata(header: dict[str, str]) -> dict[str, Any]:
    """modules/sd_models.read_metadata_from_safetensors: text values starting with "{" are parsed as JSON."""
    out: dict[str, Any] = {}
    for key, value in header.items():
        out[key] = value
        if isinstance(value, str) and value[0:1] == "{":
            with contextlib.suppress(ValueError):
                out[key] = json.loads(value)
    return out


def webui_metadata_table(metadata: dict[str, Any]) -> list[tuple[str, Any]]:
    """LoraUserMetadataEditor.get_metadata_table (A1111 1.10 and Forge alike): labels, date, buckets, dataset."""
    table: list[tuple[str, Any]] = []
    for key, label in {
        "ss_output_name": "Output name:",
        "ss_sd_model_name": "Model:",
        "ss_clip_skip": "Clip skip:",
        "ss_network_module": "Kohya module:",
    }.items():
        value = metadata.get(key)
        if value is not None and str(value) != "None":
            table.append((label, html.escape(value)))
    started = metadata.get("ss_training_started_at")
    if started:
        table.append(
            ("Date trained:", datetime.datetime.utcfromtimestamp(float(started)).strftime("%Y-%m-%d %H:%M"))
        )
    bucket_info = metadata.get("ss_bucket_info")
    if bucket_info and "buckets" in bucket_info:
        resolutions: dict[str, int] = {}
        for _, bucket in bucket_info["buckets"].items():
            resolution = bucket["resolution"]
            text = f"{resolution[1]}x{resolution[0]}"
            resolutions[text] = resolutions.get(text, 0) + int(bucket["count"])
        table.append(("Resolution:", ", ".join(sorted(resolutions, key=resolutions.get, reverse=True))))
    images = sum(int(params.get("img_count", 0)) for params in metadata.get("ss_dataset_dirs", {}).values())
    if images:
        table.append(("Dataset size:", images))
    return table


def webui_tags(metadata: dict[str, Any]) -> list[tuple[str, int]]:
    """build_tags: tag counts over ss_tag_frequency's folders, most frequent first."""
    tags: dict[str, int] = {}
    frequency = metadata.get("ss_tag_frequency", {})
    if frequency is not None and hasattr(frequency, "items"):
        for _, per_dir in frequency.items():
            for tag, count in per_dir.items():
                tags[tag.strip()] = tags.get(tag.strip(), 0) + int(count)
    return sorted(tags.items(), key=lambda pair: pair[1], reverse=True)


def webui_sd_version(metadata: dict[str, Any]) -> str:
    """NetworkOnDisk.detect_version: which model family the Lora card is shown for."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


@pytest.mark.parametrize("family", ["sd_1_5", "sd_xl"])
def test_the_webui_lora_dialog_reads_our_metadata(tmp_path: Path, family: str) -> None:
    header = saved(
        tmp_path, {**ours(), **({"ss_base_model_version": "sdxl_base_v1-0"} if family == "sd_xl" else {})}
    )
    metadata = webui_read_metadata(header)
    table = dict(webui_metadata_table(metadata))
    assert table["Output name:"] == "sample" and table["Clip skip:"] == "2"
    assert table["Resolution:"] == "512x512" and table["Dataset size:"] == 8
    assert table["Date trained:"] == "2023-11-14 22:13"
    assert webui_tags(metadata) == [("demo", 8)]
    assert webui_sd_version(metadata) == ("SDXL" if family == "sd_xl" else "SD1")
    assert metadata["sshs_model_hash"][0:12]  # Forge indexes Loras by this short hash


def test_the_bucket_info_shape_we_used_to_write_breaks_the_webui_dialog() -> None:
    """The near miss this guards against: {"buckets": {"256x256": 15}} made the dialog raise TypeError."""
    old = webui_read_metadata({**ours(), "ss_bucket_info": json.dumps({"buckets": {"256x256": 15}})})
    with pytest.raises(TypeError):
        webui_metadata_table(old)
    unbucketed = webui_read_metadata({**ours(), "ss_bucket_info": "null"})  # kohya without enable_bucket
    assert "Resolution:" not in dict(webui_metadata_table(unbucketed))
