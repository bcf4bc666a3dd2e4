"""Saving/loading kohya LoRA files: precisions, metadata, hashes, atomic writes, and diffusers as a second reader."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from kohya_backend.config.validate import validate_config
from kohya_backend.errors import ConfigError, ModelError, TrainManagementError
from kohya_backend.lora.metadata import BaseModel, DatasetInfo, NetworkSettings, training_metadata
from kohya_backend.lora.network import LoRANetwork
from kohya_backend.lora.save import SAVE_DTYPES, load_lora, lora_hashes, save_lora
from kohya_backend.models.arch import sd15_architecture, sdxl_architecture

REPO = Path(__file__).resolve().parents[1]

# every ss_* key kohya.md lists (but ss_vae_name: a separate VAE is not supported, so it is never written)
KOHYA_SS_KEYS = [
    "ss_output_name",
    "ss_sd_model_name",
    "ss_base_model_version",
    "ss_v2",
    "ss_resolution",
    "ss_clip_skip",
    "ss_num_train_images",
    "ss_tag_frequency",
    "ss_dataset_dirs",
    "ss_bucket_info",
    "ss_training_started_at",
    "ss_network_module",
    "ss_session_id",
    "ss_training_finished_at",
    "ss_steps",
    "ss_epoch",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_optimizer",
    "ss_lr_scheduler",
    "ss_lr_warmup_steps",
    "ss_max_train_steps",
    "ss_num_epochs",
    "ss_num_batches_per_epoch",
    "ss_batch_size_per_device",
    "ss_total_batch_size",
    "ss_gradient_accumulation_steps",
    "ss_gradient_checkpointing",
    "ss_max_grad_norm",
    "ss_seed",
    "ss_mixed_precision",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_network_dropout",
    "ss_max_token_length",
    "ss_sd_model_hash",
    "ss_new_sd_model_hash",
    "ss_noise_offset",
    "ss_min_snr_gamma",
    "ss_prior_loss_weight",
    "ss_cache_latents",
    "ss_shuffle_caption",
    "ss_keep_tokens",
    "ss_enable_bucket",
    "ss_min_bucket_reso",
    "ss_max_bucket_reso",
    "ss_flip_aug",
    "ss_color_aug",
    "ss_random_crop",
    "ss_caption_dropout_rate",
    "ss_num_reg_images",
]

CONFIG = {
    "learning_rate": 1e-4,
    "unet_lr": 1e-4,
    "text_encoder_lr": 1e-5,
    "optimizer_type": "AdamW8bit",
    "lr_scheduler": "cosine_with_restarts",
    "lr_warmup_steps": 0,
    "max_train_steps": 1600,
    "max_train_epochs": 10,
    "train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "gradient_checkpointing": True,
    "max_grad_norm": 1.0,
    "seed": 1337,
    "mixed_precision": "bf16",
    "network_dim": 32,
    "network_alpha": 16,
    "network_args": ["conv_dim=4", "conv_alpha=1"],
    "clip_skip": 2,
    "max_token_length": 225,
    "cache_latents": True,
    "shuffle_caption": True,
    "enable_bucket": True,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "output_name": "demo",
}
NETWORK = NetworkSettings(
    dim=32, alpha=16.0, conv_dim=4, conv_alpha=1.0, given_args={"conv_dim": "4", "conv_alpha": "1"}
)


def sample_metadata(family: str = "sd_1_5", config: dict | None = None, **overrides) -> dict[str, str]:
    values = {**CONFIG, **(config or {})}
    if family == "sd_xl":
        values.pop("clip_skip")
    args = {
        "config": validate_config(values, family, require_paths=False),
        "network": NETWORK,
        "optimizer": "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)",
        "session_id": "123456",
        "started_at": 1_700_000_000.5,
        "finished_at": 1_700_000_600.25,
        "steps": 40,
        "epoch": 2,
        "max_train_steps": 50,
        "num_epochs": 10,
        "num_batches_per_epoch": 10,
        "num_train_images": 20,
        "num_reg_images": 0,
        "dataset": DatasetInfo(
            tag_frequency={"20_demo": {"cat": 3, "red hat": 1}},
            dataset_dirs={"20_demo": {"n_repeats": 20, "img_count": 1}},
            bucket_info={"buckets": {"0": {"resolution": [512, 512], "count": 20}}, "mean_img_ar_error": 0.0},
        ),
        "base_model": BaseModel(Path("/models/sd15.safetensors"), "ab" * 32, "12345678"),
    }
    args.update(overrides)
    return training_metadata(**args)


def big_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-shaped state dict over 1.1 MiB in fp16, so the legacy hash window holds tensor data."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_a_proj_in.alpha": torch.tensor(4.0),
        "lora_unet_a_proj_in.lora_down.weight": torch.randn(8, 40000, generator=gen),
        "lora_unet_a_proj_in.lora_up.weight": torch.randn(40000, 8, generator=gen),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(2.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 32, generator=gen),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(64, 4, generator=gen),
    }


# ------------------------------------------------------------------------------------------------ metadata
def test_metadata_has_every_kohya_key_as_strings():
    md = sample_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert sorted(set(KOHYA_SS_KEYS) - set(md)) == []
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_base_model_version"] == "sd_v1"
    assert md["ss_output_name"] == "demo"
    assert md["ss_sd_model_name"] == "sd15.safetensors" and "ss_vae_name" not in md
    assert md["ss_new_sd_model_hash"] == "ab" * 32 and md["ss_sd_model_hash"] == "12345678"
    assert md["ss_resolution"] == "(512, 512)"
    assert md["ss_training_started_at"] == "1700000000.5"
    assert float(md["ss_training_finished_at"]) == 1_700_000_600.25
    assert (md["ss_steps"], md["ss_epoch"], md["ss_num_epochs"]) == ("40", "2", "10")
    assert md["ss_max_train_steps"] == "50"  # the plan's total, passed in
    assert md["ss_total_batch_size"] == "4" and md["ss_batch_size_per_device"] == "2"
    assert md["ss_optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("32", "16.0")  # from the network built
    assert (md["ss_cache_latents"], md["ss_color_aug"], md["ss_v2"]) == ("True", "False", "False")
    assert (md["ss_clip_skip"], md["ss_noise_offset"]) == ("2", "None")
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1"}
    assert json.loads(md["ss_tag_frequency"]) == {"20_demo": {"cat": 3, "red hat": 1}}
    assert json.loads(md["ss_dataset_dirs"])["20_demo"] == {"n_repeats": 20, "img_count": 1}
    assert json.loads(md["ss_bucket_info"])["buckets"]["0"]["count"] == 20
    assert md["ss_training_comment"] == "None"  # sd-scripts writes str(None) when unset
    commented = sample_metadata(config={"training_comment": "trigger: sks"})
    assert commented["ss_training_comment"] == "trigger: sks"


def test_metadata_network_keys_come_from_the_network_built():
    md = sample_metadata(network=NetworkSettings(dim=8, alpha=4.0, dropout=0.1))
    assert (md["ss_network_dim"], md["ss_network_alpha"], md["ss_network_dropout"]) == ("8", "4.0", "0.1")
    assert "ss_network_args" not in md  # sd-scripts writes them only when set
    built = sample_metadata(
        network=NetworkSettings(dim=8, alpha=4.0, conv_dim=2, given_args={"rank_dropout": "0.1"})
    )
    assert json.loads(built["ss_network_args"]) == {"rank_dropout": "0.1", "conv_dim": "2"}


def test_modelspec_keys_per_family():
    md = sample_metadata()
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.implementation"] == "diffusers"
    assert md["modelspec.title"] == "demo"
    assert md["modelspec.resolution"] == "512x512"
    assert md["modelspec.prediction_type"] == "epsilon"
    assert md["modelspec.date"].startswith(time.strftime("%Y-%m-%d", time.localtime(1_700_000_600.25)))
    xl = sample_metadata("sd_xl", config={"resolution": "1024,768", "v_parameterization": True})
    assert xl["ss_base_model_version"] == "sdxl_base_v1-0"
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert xl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (xl["modelspec.resolution"], xl["ss_resolution"]) == ("1024x768", "(1024, 768)")
    assert xl["modelspec.prediction_type"] == "v"
    assert sample_metadata(config={"v_parameterization": True})["ss_base_model_version"] == "sd_v1_v"


def test_metadata_defaults_and_unknowns():
    before = time.time()
    md = sample_metadata(
        config={"max_train_epochs": None, "output_name": None, "unet_lr": None, "text_encoder_lr": None},
        finished_at=None,
        base_model=None,
        dataset=DatasetInfo({}, {}),
    )
    assert before <= float(md["ss_training_finished_at"]) <= time.time()
    assert md["ss_output_name"] == md["modelspec.title"] == "last"  # kohya's name when output_name is unset
    assert md["ss_bucket_info"] == "null"
    assert md["ss_learning_rate"] == "0.0001"
    assert (
        md["ss_unet_lr"] == md["ss_text_encoder_lr"] == "None"
    )  # the arguments as given, as sd-scripts writes
    for key in ("ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_vae_name"):
        assert key not in md


# ------------------------------------------------------------------------------------------ save and load
@pytest.mark.parametrize("precision", ["fp16", "bf16", "float"])
def test_round_trip_in_each_precision(tmp_path, precision):
    sd = big_state_dict()
    md = sample_metadata()
    path = save_lora(tmp_path / "demo.safetensors", sd, md, save_precision=precision)
    assert path == tmp_path / "demo.safetensors"
    tensors, metadata = load_lora(path)
    dtype = SAVE_DTYPES[precision]
    assert sorted(tensors) == sorted(sd)
    for key, value in sd.items():
        assert tensors[key].dtype == dtype  # alpha included
        assert torch.equal(tensors[key], value.to(dtype))
    assert {k: v for k, v in metadata.items() if not k.startswith("sshs_")} == md
    assert set(metadata) - set(md) == {"sshs_model_hash", "sshs_legacy_hash"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.safetensors"]


def test_hashes_match_an_independent_computation(tmp_path):
    md = {**sample_metadata(), "sshs_model_hash": "stale", "user_note": "not part of the hash"}
    path = save_lora(tmp_path / "h.safetensors", big_state_dict(), md, save_precision="fp16")
    raw = path.read_bytes()
    tensors, metadata = load_lora(path)
    header_len = int.from_bytes(raw[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len :]).hexdigest()
    # the legacy hash is taken on the file as written with only the ss_* metadata
    ss_only = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert len(ss_only) > 0x110000
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["sshs_legacy_hash"] != hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    # metadata outside ss_* does not move the hashes; other tensor data does
    assert lora_hashes(tensors, {**md, "modelspec.title": "x"}) == lora_hashes(tensors, md)
    other = {k: v.to(torch.float16) for k, v in big_state_dict(seed=1).items()}
    assert lora_hashes(other, md)["sshs_model_hash"] != metadata["sshs_model_hash"]


def test_replaces_an_existing_file(tmp_path):
    path = tmp_path / "demo.safetensors"
    path.write_bytes(b"old")
    save_lora(path, big_state_dict(), {}, save_precision="fp16")
    assert load_lora(path)[0].keys() == big_state_dict().keys()


def test_failed_write_leaves_nothing_behind(tmp_path):
    path = tmp_path / "demo.safetensors"
    path.write_bytes(b"previous epoch file")
    calls = []

    def fail_midway(fh, data):
        fh.write(data[: len(data) // 2])
        calls.append(len(data))
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        save_lora(path, big_state_dict(), {}, save_precision="fp16", write=fail_midway)
    assert caught.value.errno == errno.ENOSPC and calls
    assert path.read_bytes() == b"previous epoch file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.safetensors"]
    new = tmp_path / "new.safetensors"
    with pytest.raises(OSError):
        save_lora(new, big_state_dict(), {}, save_precision="fp16", write=fail_midway)
    assert not new.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["demo.safetensors"]


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs RLIMIT_FSIZE (Linux)")
def test_real_write_failure_from_the_os(tmp_path):
    """The kernel refuses the write (file size limit, EFBIG) halfway through: no partial file remains."""
    script = textwrap.dedent(
        """
        import resource, signal, sys, torch
        from pathlib import Path
        from kohya_backend.lora.save import save_lora
        sd = {"lora_unet_a.lora_down.weight": torch.randn(8, 65536), "lora_unet_a.alpha": torch.tensor(8.0)}
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        try:
            save_lora(Path(sys.argv[1]), sd, {"ss_output_name": "x"}, save_precision="float")
        except OSError as exc:
            print("errno", exc.errno)
            sys.exit(3)
        """
    )
    path = tmp_path / "out" / "demo.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"keep me")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert f"errno {errno.EFBIG}" in result.stdout
    assert path.read_bytes() == b"keep me"
    assert sorted(p.name for p in path.parent.iterdir()) == ["demo.safetensors"]


def test_bad_arguments_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="save_precision"):
        save_lora(tmp_path / "x.safetensors", big_state_dict(), {}, save_precision="fp8")
    with pytest.raises(TrainManagementError, match="strings"):
        save_lora(tmp_path / "x.safetensors", big_state_dict(), {"ss_steps": 3}, save_precision="fp16")  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ModelError, match="not found"):
        load_lora(tmp_path / "missing.safetensors")
    path = save_lora(tmp_path / "t.safetensors", big_state_dict(), {}, save_precision="fp16")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelError, match="cannot read"):
        load_lora(path)


def test_network_state_dict_save_load_into_new_network(tmp_path):
    torch.manual_seed(0)
    arch = sd15_architecture("tiny")
    unet, tes = arch.build_unet(), arch.build_text_encoders()
    kwargs = {"family": arch.family, "unet": unet, "text_encoders": tes, "network_dim": 4, "network_alpha": 2}
    source = LoRANetwork(**kwargs)
    with torch.no_grad():
        for lora in source.all_loras:
            lora.lora_up.weight.normal_()
    path = save_lora(
        tmp_path / "n.safetensors", source.kohya_state_dict(), sample_metadata(), save_precision="bf16"
    )
    target = LoRANetwork(**kwargs)
    target.load_kohya_state_dict(load_lora(path)[0])
    for key, value in source.kohya_state_dict(torch.bfloat16).items():
        assert torch.equal(target.kohya_state_dict(torch.bfloat16)[key], value)


# --------------------------------------------------------------------------- diffusers as a second reader
def tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab = {"!": 1, "<|startoftext|>": 0, "<|endoftext|>": 2, "a</w>": 3}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def run_models(unet, tes, arch):
    gen = torch.Generator().manual_seed(7)
    ids = torch.tensor([[0, 3, 17, 400, 2, 2, 2]])
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 7, arch.unet["cross_attention_dim"], generator=gen)
    kwargs = {}
    if arch.family == "sd_xl":
        pooled = arch.unet["projection_class_embeddings_input_dim"] - 6 * arch.unet["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=gen),
            "time_ids": torch.rand(1, 6, generator=gen),
        }
    with torch.no_grad():
        te_outs = [te(ids).last_hidden_state for te in tes]
        return [unet(x, torch.tensor([300]), encoder_hidden_states=ctx, **kwargs).sample, *te_outs]


@pytest.mark.parametrize(("family", "conv_dim"), [("sd_1_5", None), ("sd_1_5", 2), ("sd_xl", 2)])
def test_diffusers_loads_every_key_with_the_same_result(tmp_path, family, conv_dim):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    arch = sd15_architecture("tiny") if family == "sd_1_5" else sdxl_architecture("tiny")
    unet, vae = arch.build_unet().eval(), arch.build_vae()
    tes = [te.eval() for te in arch.build_text_encoders()]
    fresh_unet, fresh_tes = copy.deepcopy(unet), copy.deepcopy(tes)
    base = run_models(unet, tes, arch)
    network = LoRANetwork(
        family=family, unet=unet, text_encoders=tes, network_dim=4, network_alpha=2.0, conv_dim=conv_dim
    )
    with torch.no_grad():
        for lora in network.all_loras:
            lora.lora_up.weight.normal_(0, 0.3)
    network.apply_to()
    ours = run_models(unet, tes, arch)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours, base))
    path = save_lora(
        tmp_path / "lora.safetensors",
        network.kohya_state_dict(),
        sample_metadata(family),
        save_precision="float",
    )

    tokenizer = tiny_tokenizer(tmp_path)
    parts = {
        "vae": vae,
        "unet": fresh_unet,
        "scheduler": DDPMScheduler(steps_offset=1, clip_sample=False),
        "text_encoder": fresh_tes[0],
        "tokenizer": tokenizer,
    }
    if family == "sd_1_5":
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    else:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=fresh_tes[1], tokenizer_2=tokenizer)
    pipe.load_lora_weights(str(path))  # raises when a key cannot be converted

    def adapted(module):
        return sum(isinstance(m, LoraLayer) for m in module.modules())

    assert adapted(pipe.unet) == len(network.unet_loras)
    assert sum(adapted(te) for te in fresh_tes) == len(network.text_encoder_loras)
    theirs = run_models(pipe.unet, fresh_tes, arch)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
