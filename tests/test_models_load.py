"""Loading generated single-file checkpoints into modules whose outputs equal the originals'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kohya_backend.assets.checkpoints import ARCHITECTURE_METADATA_KEY, random_components, write_checkpoint
from kohya_backend.assets.tokenizer import write_tiny_tokenizer
from kohya_backend.errors import FamilyMismatchError, ModelError, TokenizerUnavailableError
from kohya_backend.models.arch import architecture_for, architecture_to_json
from kohya_backend.models.checkpoint import read_checkpoint
from kohya_backend.models.load import _materialise, load_checkpoint


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _unet_out(unet, family: str, arch) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, arch.unet["cross_attention_dim"], generator=gen)
    kwargs = {}
    if family == "sd_xl":
        pooled = arch.text_encoders[1]["projection_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), ctx, **kwargs).sample


@pytest.mark.parametrize(
    ("family", "fmt"),
    [("sd_1_5", "safetensors"), ("sd_1_5", "ckpt"), ("sd_xl", "safetensors"), ("sd_xl", "ckpt")],
)
def test_loaded_modules_equal_the_originals(tmp_path: Path, tok_dir: Path, family: str, fmt: str) -> None:
    path = write_checkpoint(tmp_path / f"model.{fmt}", family, fmt=fmt, seed=5)
    model = load_checkpoint(path, family, tokenizer_dir=tok_dir)
    arch = architecture_for(family, "tiny")
    assert model.arch == arch and model.family == family and model.path == path
    unet, vae, tes = random_components(arch, seed=5)

    expected = _unet_out(unet, family, arch)
    assert expected.abs().mean() > 0.01
    assert torch.equal(_unet_out(model.unet, family, arch), expected)

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latent = model.vae.encode(image).latent_dist.mean
        assert torch.equal(latent, vae.encode(image).latent_dist.mean)
        assert torch.equal(model.vae.decode(latent).sample, vae.decode(latent).sample)

    assert len(model.tokenizers) == len(model.text_encoders) == len(tes)
    for tokenizer, loaded, original in zip(model.tokenizers, model.text_encoders, tes):
        ids = tokenizer(
            ["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            ours, theirs = loaded(ids, output_hidden_states=True), original(ids, output_hidden_states=True)
        assert torch.equal(ours.hidden_states[-2], theirs.hidden_states[-2])
        assert torch.equal(ours[0], theirs[0])
        if hasattr(theirs, "text_embeds"):
            assert torch.equal(ours.text_embeds, theirs.text_embeds)

    params = [*model.unet.parameters(), *model.vae.parameters(), *model.text_encoders[0].parameters()]
    assert not any(p.requires_grad for p in params)
    assert not any(p.is_meta for p in params)
    assert not any(b.is_meta for m in (model.unet, model.vae, *model.text_encoders) for b in m.buffers())


def test_dtypes_are_applied(tmp_path: Path, tok_dir: Path) -> None:
    path = write_checkpoint(tmp_path / "half.safetensors", "sd_1_5", dtype=torch.float16)
    model = load_checkpoint(
        path, "sd_1_5", dtype=torch.bfloat16, vae_dtype=torch.float32, tokenizer_dir=tok_dir
    )
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.text_encoders[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    reference = load_file(str(path))["model.diffusion_model.out.2.weight"]
    assert torch.equal(model.unet.conv_out.weight, reference.to(torch.bfloat16))


def _rewrite(path: Path, change) -> Path:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    change(tensors, metadata)
    out = path.with_name("changed.safetensors")
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_extra_and_missing_keys_are_reported(tmp_path: Path, tok_dir: Path) -> None:
    path = write_checkpoint(tmp_path / "m.safetensors", "sd_xl")

    def add_extra(tensors, _meta):
        tensors["model.diffusion_model.new_block.weight"] = torch.zeros(2)

    with pytest.raises(ModelError, match=r"unexpected key\(s\): model\.diffusion_model\.new_block\.weight"):
        load_checkpoint(_rewrite(path, add_extra), "sd_xl", tokenizer_dir=tok_dir)

    def drop(tensors, _meta):
        del tensors["conditioner.embedders.1.model.text_projection"]

    with pytest.raises(
        ModelError, match=r"missing key\(s\): conditioner\.embedders\.1\.model\.text_projection"
    ):
        load_checkpoint(_rewrite(path, drop), "sd_xl", tokenizer_dir=tok_dir)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_family_is_checked_before_loading(tmp_path: Path, tok_dir: Path, fmt: str) -> None:
    path = write_checkpoint(tmp_path / f"xl.{fmt}", "sd_xl", fmt=fmt)
    with pytest.raises(
        FamilyMismatchError, match=rf"(?s)model xl\.{fmt} is an SDXL checkpoint.*choose sd_xl"
    ):
        load_checkpoint(path, "sd_1_5", tokenizer_dir=tok_dir)
    with pytest.raises(ModelError, match="FM type 'sdxl' is not supported"):
        load_checkpoint(path, "sdxl", tokenizer_dir=tok_dir)


def test_architecture_metadata_wins_and_is_validated(tmp_path: Path, tok_dir: Path) -> None:
    path = write_checkpoint(tmp_path / "m.safetensors", "sd_1_5")

    def strip(_tensors, meta):
        del meta[ARCHITECTURE_METADATA_KEY]

    # Without the entry the file is taken for a full-size SD 1.5 model, whose shapes it does not have.
    with pytest.raises(ModelError, match=r"shape mismatch"):
        load_checkpoint(_rewrite(path, strip), "sd_1_5", tokenizer_dir=tok_dir)

    def wrong_family(_tensors, meta):
        meta[ARCHITECTURE_METADATA_KEY] = architecture_to_json(architecture_for("sd_xl", "tiny"))

    with pytest.raises(ModelError, match="declares a sd_xl architecture"):
        load_checkpoint(_rewrite(path, wrong_family), "sd_1_5", tokenizer_dir=tok_dir)

    def garbage(_tensors, meta):
        meta[ARCHITECTURE_METADATA_KEY] = "{not json"

    with pytest.raises(ModelError, match=r"unreadable train_management\.architecture"):
        load_checkpoint(_rewrite(path, garbage), "sd_1_5", tokenizer_dir=tok_dir)


def test_tiny_model_without_fitting_tokenizer_fails_early(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "m.safetensors", "sd_1_5")
    with pytest.raises(TokenizerUnavailableError, match="tokenizer_cache_dir"):
        load_checkpoint(path, "sd_1_5", tokenizer_dir=tmp_path / "none")


def test_tokenizer_folder_beside_the_checkpoint_is_found(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "m.safetensors", "sd_1_5")
    with pytest.raises(TokenizerUnavailableError):
        load_checkpoint(path, "sd_1_5")
    write_tiny_tokenizer(tmp_path / "tokenizer")
    loaded = load_checkpoint(path, "sd_1_5")
    assert loaded.tokenizers[0].tokenize("a cat") == ["a</w>", "cat</w>"]


def _rss_file_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
@pytest.mark.parametrize("mapped", [True, False])
def test_casting_a_mapped_file_gives_its_pages_back_at_once(tmp_path: Path, mapped: bool) -> None:
    path = tmp_path / "half.safetensors"
    save_file({f"w{i}": torch.randn(4096, 4096).half() for i in range(3)}, str(path))  # 3 x 32 MiB
    state, _ = read_checkpoint(path)
    sources = dict(state)  # the other components' tensors keep the file mapped during a real load
    checksum = sum(float(t.float().sum()) for t in sources.values())  # every page resident
    module = torch.nn.Module()
    for key in state:
        module.register_parameter(key, torch.nn.Parameter(torch.empty(4096, 4096, device="meta")))
    before = _rss_file_mib()
    _materialise(module, state, dtype=torch.float32, device="cpu", what="test", path=path, mapped=mapped)
    dropped = before - _rss_file_mib()
    assert (dropped > 80) is mapped  # 96 MiB of file pages released while the mapping lives on
    assert sum(float(p.sum()) for p in module.parameters()) == pytest.approx(checksum, rel=1e-6)
    assert sum(float(t.float().sum()) for t in sources.values()) == pytest.approx(checksum, rel=1e-6)


def test_fp16_file_loaded_in_fp32_holds_the_exact_upcast_weights(tmp_path: Path, tok_dir: Path) -> None:
    path = write_checkpoint(tmp_path / "half.safetensors", "sd_xl", dtype=torch.float16, seed=3)
    model = load_checkpoint(path, "sd_xl", dtype=torch.float32, tokenizer_dir=tok_dir)
    half = load_checkpoint(path, "sd_xl", dtype=torch.float16, vae_dtype=torch.float16, tokenizer_dir=tok_dir)
    for ours, theirs in zip(
        (model.unet, model.vae, *model.text_encoders), (half.unet, half.vae, *half.text_encoders)
    ):
        ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
        assert ours_sd.keys() == theirs_sd.keys()
        for name, a in ours_sd.items():
            assert a.dtype == torch.float32 or not a.is_floating_point(), name
            assert torch.equal(a, theirs_sd[name].to(a.dtype)), name
