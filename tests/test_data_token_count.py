"""The health report's token counter against the tokenizer the trainer uses (transformers' CLIP tokenizer built
from the same open-clip-torch vocabulary): the same count for every caption, start and end tokens left out."""

from __future__ import annotations

import pytest

from kohya_backend.data.token_count import EXACT, token_counter
from kohya_backend.models.tokenizers import load_tokenizers

CAPTIONS = [
    "a photo of a cat",
    "1girl, solo, long_hair, looking at viewer, smile!!, (masterpiece:1.2), 4k, 2024",
    "Héllo wörld &amp; café — naïve test_tag, don't we'll, it's",
    "  multiple   spaces\tand a tab <lora:x:1> [tag] {braces} ...",
    "sks dog, ultra-detailed, 8K UHD, f/1.8, 35mm, bokeh",
    "日本語のキャプション, emoji 🐱, Ω",
]


def test_counts_match_the_trainers_clip_tokenizer() -> None:
    count, method = token_counter()
    if method != EXACT:
        pytest.skip("open-clip-torch's vocabulary is not installed (requirements-vocab.txt)")
    [tokenizer] = load_tokenizers("sd_1_5")
    for caption in CAPTIONS:
        assert count(caption) == len(tokenizer(caption).input_ids) - 2, caption
