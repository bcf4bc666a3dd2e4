"""Offline tokenizers: a given folder, the local HF cache layout, open-clip-torch's vocabulary, and the error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from kohya_backend.assets.tokenizer import write_tiny_tokenizer
from kohya_backend.errors import TokenizerUnavailableError
from kohya_backend.models.arch import sd15_architecture
from kohya_backend.models.tokenizers import bytes_to_unicode, load_tokenizers, open_clip_vocab_path

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


def _fake_hf_cache(root: Path, repo: str, files_from: Path) -> Path:
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    snapshot = folder / "snapshots" / "0123abcd"
    shutil.copytree(files_from, snapshot)
    return root


def test_tiny_tokenizer_fits_the_tiny_text_encoders(tiny_dir: Path) -> None:
    tok = CLIPTokenizer.from_pretrained(str(tiny_dir))
    assert tok.model_max_length == 77
    assert len(tok) <= int(sd15_architecture("tiny").text_encoders[0]["vocab_size"])
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == len(tok) - 1
    assert tok.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert tok.tokenize("zq") == ["z", "q</w>"]  # unseen words fall back to byte symbols, never unknown


def test_tokenizer_dir_flat_and_per_encoder_subfolders(tiny_dir: Path, tmp_path: Path) -> None:
    toks = load_tokenizers("sd_xl", tokenizer_dir=tiny_dir, vocab_size_limit=1000)
    assert len(toks) == 2
    assert toks[0].pad_token == "<|endoftext|>" and toks[1].pad_token == "!" and toks[1].pad_token_id == 0
    assert toks[0]("a cat").input_ids == toks[1]("a cat").input_ids
    nested = tmp_path / "cache_dir"
    shutil.copytree(tiny_dir, nested / "tokenizer")
    shutil.copytree(tiny_dir, nested / "tokenizer_2")
    vocab = json.loads((tiny_dir / "vocab.json").read_text())
    vocab["extra</w>"] = len(vocab)
    (nested / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    first, second = load_tokenizers("sd_xl", tokenizer_dir=nested)
    assert "extra</w>" in first.get_vocab() and "extra</w>" not in second.get_vocab()
    (sd15,) = load_tokenizers("sd_1_5", tokenizer_dir=tiny_dir)
    assert sd15.model_max_length == 77


def test_open_clip_vocabulary_gives_clip_ids() -> None:
    if open_clip_vocab_path() is None:
        pytest.skip("open-clip-torch is not installed")
    first, second = load_tokenizers("sd_xl", hf_cache_dir=Path("/nonexistent-hf-cache"))
    assert len(first) == 49408
    assert first("a photo of a cat").input_ids == CAT_IDS
    assert second("a photo of a cat").input_ids == CAT_IDS
    padded = second("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [0] * 70 and second.pad_token == "!"
    padded_1 = first("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert padded_1[7:] == [49407] * 70
    assert first.model_max_length == second.model_max_length == 77


def test_hf_cache_layout_is_used_before_open_clip(tiny_dir: Path, tmp_path: Path) -> None:
    cache = _fake_hf_cache(tmp_path / "hub", "openai/clip-vit-large-patch14", tiny_dir)
    first, second = load_tokenizers("sd_xl", hf_cache_dir=cache)
    assert len(first) == len(second) < 1000  # the cached (tiny) vocabulary, not open_clip's 49408
    assert second.pad_token_id == 0


def test_error_when_nothing_is_available(tmp_path: Path) -> None:
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    with pytest.raises(TokenizerUnavailableError) as info:
        load_tokenizers("sd_xl", tokenizer_dir=tmp_path / "missing", hf_cache_dir=empty, use_open_clip=False)
    text = str(info.value)
    assert "openai/clip-vit-large-patch14" in text and "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k" in text
    assert str(empty) in text
    assert "pip install --no-deps open-clip-torch" in text
    assert f"tokenizer_dir {tmp_path / 'missing'}: not found" in text


def test_vocabulary_larger_than_the_text_encoder_is_skipped(tmp_path: Path) -> None:
    if open_clip_vocab_path() is None:
        pytest.skip("open-clip-torch is not installed")
    empty = tmp_path / "hub"
    empty.mkdir()
    with pytest.raises(
        TokenizerUnavailableError, match="49408 tokens exceeds the text encoder's 1000"
    ) as info:
        load_tokenizers("sd_1_5", hf_cache_dir=empty, vocab_size_limit=1000)
    assert "tokenizer_cache_dir" in str(info.value)


def test_malformed_tokenizer_dir_is_reported(tiny_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "vocab.json").write_text(
        (tiny_dir / "vocab.json").read_text().replace('"a</w>":', '"b_x</w>":')
    )
    empty = tmp_path / "hub"
    empty.mkdir()
    with pytest.raises(TokenizerUnavailableError, match=r"tokenizer_dir .*broken: unreadable \(.*a</w>"):
        load_tokenizers("sd_1_5", tokenizer_dir=broken, hf_cache_dir=empty, use_open_clip=False)


def test_incomplete_vocabulary_is_rejected(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text('{"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}')
    (broken / "merges.txt").write_text("#version: 0.2\n")
    empty = tmp_path / "hub"
    empty.mkdir()
    with pytest.raises(TokenizerUnavailableError, match="incomplete CLIP vocabulary"):
        load_tokenizers("sd_1_5", tokenizer_dir=broken, hf_cache_dir=empty, use_open_clip=False)


def test_unknown_family_and_byte_alphabet() -> None:
    with pytest.raises(TokenizerUnavailableError, match="sd_3"):
        load_tokenizers("sd_3")
    alphabet = bytes_to_unicode()
    assert len(set(alphabet.values())) == 256 and alphabet[ord("!")] == "!" and alphabet[ord(" ")] == "Ġ"


def test_tokenizer_folder_beside_the_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    beside = tmp_path / "models" / "tokenizer"
    shutil.copytree(tiny_dir, beside)
    (tok,) = load_tokenizers("sd_1_5", beside_dir=beside, vocab_size_limit=1000, use_open_clip=False)
    assert tok.tokenize("a cat") == ["a</w>", "cat</w>"]
    # A full-size text encoder never takes the small tokenizer lying beside it: CLIP's vocabulary wins.
    if open_clip_vocab_path() is not None:
        (full,) = load_tokenizers("sd_1_5", beside_dir=beside, vocab_size_limit=49408, hf_cache_dir=tmp_path)
        assert full("a photo of a cat").input_ids == CAT_IDS
    with pytest.raises(TokenizerUnavailableError, match="is not the text encoder's 49408"):
        load_tokenizers(
            "sd_1_5", beside_dir=beside, vocab_size_limit=49408, hf_cache_dir=tmp_path, use_open_clip=False
        )
