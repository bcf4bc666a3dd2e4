"""A tiny CLIP-style BPE tokenizer (vocab.json + merges.txt) for tests and demos with tiny text encoders."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path

from kohya_backend.models.tokenizers import bytes_to_unicode, write_clip_bpe_files

# The words the merges are learnt from: the vocabulary of short image captions.
_CORPUS = """
a photo of a cat sitting on a sofa. a photo of a dog running in the park. a painting of a woman with red hair.
a portrait of a man wearing a hat. a close up photo of a flower in the garden. a drawing of a house near the sea.
an illustration of a girl holding an umbrella in the rain. a picture of a car on the street at night.
a landscape with mountains, trees and a river under a blue sky. a cute anime character smiling, high quality.
masterpiece, best quality, detailed face, soft light, sunset, city, forest, beach, snow, water, window, white,
black, green, yellow, orange, purple, pink, brown, gray, small, large, old, young, happy, standing, looking at
the camera, from the side, full body, upper body, background, simple background, outdoors, indoors, sky, cloud.
"""
TINY_MERGES = 300


def _words(text: str) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    alphabet = bytes_to_unicode()
    for word in re.findall(r"[a-z]+|[^\sa-z]", text.lower()):
        symbols = [alphabet[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        counts[tuple(symbols)] += 1
    return counts


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(text: str, limit: int) -> list[str]:
    """Learn up to `limit` BPE merges from `text` (most frequent pair first, ties by name; deterministic)."""
    words = _words(text)
    merges: list[str] = []
    while len(merges) < limit:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        words = Counter({_merge(word, best): count for word, count in words.items()})
    return merges


def write_tiny_tokenizer(directory: Path) -> Path:
    """Write a small byte-level CLIP BPE tokenizer into `directory` (loadable by CLIPTokenizer); returns it.

    Its vocabulary (byte symbols, merges learnt from caption words, the two specials: < 1000 ids) fits the
    tiny text encoders of `kohya_backend.models.arch`.
    """
    return write_clip_bpe_files(Path(directory), learn_merges(_CORPUS, TINY_MERGES))
