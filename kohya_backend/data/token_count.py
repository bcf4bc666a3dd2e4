"""How many CLIP tokens a caption takes, without torch or transformers: CLIP's byte-level BPE run over the
vocabulary the open-clip-torch package ships (the project's offline tokenizer source), else an approximation.

kohya truncates a caption to 75 tokens (150 or 225 with max_token_length), so the dataset health report counts
tokens per caption. The exact count needs CLIP's merges; without them every word and every run of punctuation
counts as one token, which undercounts long or rare words (the report says which method it used).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from kohya_backend.models.tokenizers import bytes_to_unicode, open_clip_merges, open_clip_vocab_path

EXACT = "CLIP's tokenizer (the vocabulary of the open-clip-torch package)"
APPROXIMATE = (
    "an approximation (one token per word or run of punctuation; install open-clip-torch for exact counts)"
)
# CLIP's pre-tokenizer: its specials, English contractions, runs of letters, single digits, runs of other
# symbols. \p{L} and \p{N} are written with the re module's classes (letters = word characters that are neither
# digits nor "_"; "_" counts as a symbol, as in CLIP).
_PIECES = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE
)
_APPROX = re.compile(r"[^\W_]+|(?:[^\s\w]|_)+")
_SPACES = re.compile(r"\s+")


def _clean(text: str) -> str:
    """The cleanup of the tokenizer the trainer uses (transformers' CLIP tokenizer): whitespace collapsed, lower
    case."""
    return _SPACES.sub(" ", text).strip().lower()


class ClipTokenCounter:
    """Counts CLIP BPE tokens (without the start and end tokens) with CLIP's merge table."""

    def __init__(self, merges: tuple[str, ...]) -> None:
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(merges)}
        self.byte_symbols = bytes_to_unicode()
        self._pieces = functools.lru_cache(maxsize=65536)(self._bpe_length)

    def _bpe_length(self, word: str) -> int:
        """The number of BPE pieces of one pre-tokenized word."""
        symbols = [self.byte_symbols[b] for b in word.encode("utf-8")]
        parts = (*symbols[:-1], symbols[-1] + "</w>")
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        return len(parts)

    def __call__(self, text: str) -> int:
        return sum(self._pieces(piece) for piece in _PIECES.findall(_clean(text)))


def approximate_tokens(text: str) -> int:
    """One token per word (letters and digits) or run of punctuation: a lower bound of CLIP's count."""
    return len(_APPROX.findall(_clean(text)))


@functools.cache
def token_counter() -> tuple[Callable[[str], int], str]:
    """(count function, how it counts): CLIP's BPE when open-clip-torch's vocabulary is installed, else the
    approximation."""
    path = open_clip_vocab_path()
    if path is None:
        return approximate_tokens, APPROXIMATE
    return ClipTokenCounter(open_clip_merges(str(path))), EXACT
