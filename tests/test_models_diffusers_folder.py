"""Base models as kohya also takes them: a diffusers folder, and a hub id found in the local Hugging Face cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kohya_backend.assets.checkpoints import random_components
from kohya_backend.assets.tokenizer import write_tiny_tokenizer
from kohya_backend.config.validate import validate_config
from kohya_backend.errors import ConfigError, FamilyMismatchError, ModelError
from kohya_backend.lora.save import load_lora
from kohya_backend.models.arch import architecture_for
from kohya_backend.models.diffusers_folder import detect_folder_family, resolve_model_path
from kohya_backend.models.load import load_checkpoint
from kohya_backend.train.events import EventLog
from kohya_backend.train.loop import Trainer

_PIPELINES = {"sd_1_5": "StableDiffusionPipeline", "sd_xl": "StableDiffusionXLPipeline"}


def write_diffusers_folder(dest: Path, family: str, *, seed: int = 3, old_te_keys: bool = False) -> Path:
    """A tiny model in the diffusers pipeline layout, as save_pretrained writes it (plus tokenizer folders)."""
    arch = architecture_for(family, "tiny")
    unet, vae, text_encoders = random_components(arch, seed=seed)
    unet.save_pretrained(dest / "unet")
    vae.save_pretrained(dest / "vae")
    names = ["text_encoder", "text_encoder_2"][: len(text_encoders)]
    index: dict[str, Any] = {"_class_name": _PIPELINES[family], "_diffusers_version": "0.42.1"}
    for name, encoder in zip(names, text_encoders):
        encoder.save_pretrained(dest / name)
        write_tiny_tokenizer(dest / name.replace("text_encoder", "tokenizer"))
        index[name] = ["transformers", type(encoder).__name__]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    if old_te_keys:  # the hub's older files name CLIPTextModel's tensors under "text_model."
        file = dest / "text_encoder" / "model.safetensors"
        save_file({f"text_model.{k}": v for k, v in load_file(str(file)).items()}, str(file))
    index |= {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (dest / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return dest


def fake_hub_cache(cache: Path, repo_id: str, family: str) -> Path:
    """The local Hugging Face cache layout: models--org--name/refs/main naming a snapshots/<commit> folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd", encoding="utf-8")
    return write_diffusers_folder(repo / "snapshots" / "0123abcd", family)


@pytest.mark.parametrize("family", ["sd_1_5", "sd_xl"])
def test_a_diffusers_folder_loads_with_its_own_weights_and_tokenizers(tmp_path: Path, family: str) -> None:
    folder = write_diffusers_folder(tmp_path / "model", family, old_te_keys=family == "sd_1_5")
    assert detect_folder_family(folder) == family
    model = load_checkpoint(folder, family)
    unet, vae, text_encoders = random_components(architecture_for(family, "tiny"), seed=3)
    for loaded, original in [(model.unet, unet), (model.vae, vae), *zip(model.text_encoders, text_encoders)]:
        theirs = original.state_dict()
        ours = loaded.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (
        len(model.tokenizers) == len(text_encoders) and model.arch.latent_scale == vae.config.scaling_factor
    )
    other = "sd_xl" if family == "sd_1_5" else "sd_1_5"
    with pytest.raises(FamilyMismatchError):
        load_checkpoint(folder, other)
    # a CPU bf16 run stores a folder's UNet and text-encoder Linear/Conv2d weights in bf16 as it does a file's
    stored = load_checkpoint(folder, family, compute_dtype=torch.bfloat16)
    to_q = next(m for name, m in stored.unet.named_modules() if name.endswith("attn1.to_q"))
    te_linear = next(m for m in stored.text_encoders[0].modules() if isinstance(m, torch.nn.Linear))
    assert to_q.weight.dtype == te_linear.weight.dtype == torch.bfloat16
    assert {p.dtype for p in stored.vae.parameters()} == {torch.float32}


def test_a_hub_id_is_read_from_the_local_cache_or_refused_naming_it(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "org/tiny-sd", "sd_1_5")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_path("org/tiny-sd") == snapshot
    config = validate_config(
        {"pretrained_model_name_or_path": "org/tiny-sd"}, "sd_1_5", require_paths=False, cuda_available=True
    )
    assert config.pretrained_model_name_or_path == "org/tiny-sd"
    with pytest.raises(ConfigError) as info:
        validate_config(
            {"pretrained_model_name_or_path": "org/absent"},
            "sd_1_5",
            require_paths=False,
            cuda_available=True,
        )
    [issue] = info.value.issues
    assert "not in the Hugging Face cache" in issue.message and str(cache) in issue.message
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path("no/such/file.safetensors")


@pytest.mark.parametrize("kind", ["folder", "hub id"])
def test_trains_from_a_diffusers_folder_or_a_cached_hub_id(
    tmp_path: Path, monkeypatch, tiny_assets: dict[str, Any], kind: str
) -> None:
    cache = tmp_path / "hub"
    if kind == "folder":
        model = str(write_diffusers_folder(tmp_path / "model", "sd_1_5"))
    else:
        fake_hub_cache(cache, "org/tiny-sd", "sd_1_5")
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        model = "org/tiny-sd"
    config = validate_config(
        {
            "pretrained_model_name_or_path": model,
            "train_data_dir": str(tiny_assets["data"]),
            "caption_extension": ".txt",
            "output_dir": str(tmp_path / "out"),
            "output_name": "d",
            "resolution": "64,64",
            "max_train_steps": 2,
            "network_dim": 2,
            "learning_rate": 1e-3,
        },
        "sd_1_5",
        cuda_available=False,
    )
    result = Trainer(config, events=EventLog(None, console=None)).run()
    assert result.step == 2
    _, metadata = load_lora(tmp_path / "out" / "d.safetensors")
    if kind == "folder":  # sd-scripts' hash helpers answer "IsADirectory" for a folder
        assert metadata["ss_sd_model_name"] == "model"
        assert metadata["ss_sd_model_hash"] == metadata["ss_new_sd_model_hash"] == "IsADirectory"
    else:  # a name that is no path here is written as given, without hashes
        assert metadata["ss_sd_model_name"] == "org/tiny-sd"
        assert "ss_sd_model_hash" not in metadata and "ss_new_sd_model_hash" not in metadata


def test_the_cache_is_read_without_huggingface_hub_too(tmp_path: Path, monkeypatch) -> None:
    """The WebUI's environment may lack huggingface_hub: the cache layout is then read directly."""
    import sys

    snapshot = fake_hub_cache(tmp_path / "hub", "org/tiny-sd", "sd_1_5")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # importing it now raises ImportError
    assert resolve_model_path("org/tiny-sd", cache_dir=tmp_path / "hub") == snapshot
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        resolve_model_path("org/other", cache_dir=tmp_path / "hub")
