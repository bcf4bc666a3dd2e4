"""CLIP tokenizers found offline: a given folder, the local Hugging Face cache, or a vocabulary a package ships.

Nothing here downloads. The sources are tried in order and the first one that works (and whose vocabulary fits
the text encoders, when a limit is given) wins; when none does, the error lists what was tried.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kohya_backend.errors import TokenizerUnavailableError
from kohya_backend.families import FAMILIES

MODEL_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SDXL_TE2_PAD_TOKEN = "!"
CLIP_VOCAB_SIZE = 49408

HF_REPOS = {name: family.tokenizer_repos for name, family in FAMILIES.items()}
OPEN_CLIP_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges of the file (line 0 is a header).
_CLIP_MERGE_COUNT = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte mapped to a printable character, in CLIP's vocabulary order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def clip_vocab_from_merges(merges: list[str]) -> dict[str, int]:
    """CLIP's vocabulary layout: byte symbols, the same with </w>, one entry per merge, then the two specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = (
        symbols
        + [s + "</w>" for s in symbols]
        + ["".join(m.split()) for m in merges]
        + [BOS_TOKEN, EOS_TOKEN]
    )
    return {token: index for index, token in enumerate(tokens)}


def write_clip_bpe_files(directory: Path, merges: list[str]) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of a CLIP BPE tokenizer with these merges.

    The folder loads with `CLIPTokenizer.from_pretrained` on transformers 4 (slow tokenizer) and 5 alike.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab_from_merges(merges)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The header line is required: transformers' CLIP tokenizers skip the first line of merges.txt.
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


@functools.lru_cache(maxsize=2)
def open_clip_merges(path: str) -> tuple[str, ...]:
    """The merges CLIP uses from open-clip-torch's BPE vocabulary file (read once per path)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    return tuple(lines[1 : _CLIP_MERGE_COUNT + 1])


def open_clip_vocab_path() -> Path | None:
    """The CLIP BPE vocabulary file shipped by the installed open-clip-torch package (not imported), if any."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / OPEN_CLIP_VOCAB_NAME
        if candidate.is_file():
            return candidate
    return None


def _finish(tokenizer: Any, second: bool) -> Any:
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    if second:
        tokenizer.pad_token = SDXL_TE2_PAD_TOKEN
    return tokenizer


def _from_dir(directory: Path, count: int) -> list[Any] | None:
    from transformers import CLIPTokenizer

    def has_files(folder: Path) -> bool:
        return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()

    subfolders = [directory / "tokenizer", directory / "tokenizer_2"][:count]
    if all(has_files(folder) for folder in subfolders):
        folders = subfolders
    elif has_files(directory):
        folders = [directory] * count
    else:
        return None
    return [_finish(CLIPTokenizer.from_pretrained(str(f)), i == 1) for i, f in enumerate(folders)]


def _from_hf_cache(family: str, cache_dir: Path | None) -> list[Any] | None:
    from huggingface_hub import try_to_load_from_cache
    from transformers import CLIPTokenizer

    cache = str(cache_dir) if cache_dir is not None else None

    def load(repo: str) -> Any:
        # Resolve the files first: transformers 5 silently builds an empty tokenizer when they are missing.
        files = [try_to_load_from_cache(repo, name, cache_dir=cache) for name in ("vocab.json", "merges.txt")]
        if not all(isinstance(f, str) and Path(f).is_file() for f in files):
            return None
        return CLIPTokenizer.from_pretrained(str(Path(str(files[0])).parent))

    repos = HF_REPOS[family]
    found = [load(repo) for repo in repos]
    available = [repo for repo, tok in zip(repos, found) if tok is not None]
    if not available:
        return None
    # Both SD tokenizers share CLIP's vocabulary: one cached repo serves both text encoders.
    found = [tok if tok is not None else load(available[0]) for tok in found]
    return [_finish(tok, i == 1) for i, tok in enumerate(found)]


def _from_open_clip(family: str) -> list[Any] | None:
    from transformers import CLIPTokenizer

    path = open_clip_vocab_path()
    if path is None:
        return None
    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as tmp:
        folder = write_clip_bpe_files(Path(tmp), list(open_clip_merges(str(path))))
        return [
            _finish(CLIPTokenizer.from_pretrained(str(folder)), i == 1) for i in range(len(HF_REPOS[family]))
        ]


def _vocab_problem(tokenizers: list[Any]) -> str | None:
    """Why these tokenizers are unusable (not a byte-level CLIP vocabulary), or None."""
    needed = [*bytes_to_unicode().values(), BOS_TOKEN, EOS_TOKEN]
    for tok in tokenizers:
        vocab = tok.get_vocab()
        absent = [t for t in needed if t not in vocab]
        if absent:
            return f"incomplete CLIP vocabulary ({len(absent)} required token(s) missing, e.g. {absent[0]!r})"
    return None


def _foreign(size: int, vocab_size_limit: int) -> bool:
    """True when a tokenizer of `size` ids must not feed text encoders of `vocab_size_limit` ids."""
    if vocab_size_limit >= CLIP_VOCAB_SIZE:
        return size != vocab_size_limit
    return size > vocab_size_limit


def _hf_cache_location(cache_dir: Path | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def load_tokenizers(
    family: str,
    *,
    tokenizer_dir: Path | None = None,
    vocab_size_limit: int | None = None,
    hf_cache_dir: Path | None = None,
    use_open_clip: bool = True,
    beside_dir: Path | None = None,
) -> list[Any]:
    """The CLIP tokenizer(s) of `family` (one for SD 1.5, two for SDXL; the second pads with "!"), offline.

    Tried in order: `tokenizer_dir` (kohya's tokenizer_cache_dir: vocab.json + merges.txt, or tokenizer/ and
    tokenizer_2/ subfolders), `beside_dir` (a `tokenizer` folder next to the checkpoint: a full-size text encoder
    takes it only when it has exactly the encoder's vocabulary, so a small test tokenizer never tokenises a real
    model), the local
    Hugging Face cache (`hf_cache_dir`, default the hub cache), then the CLIP
    vocabulary shipped by open-clip-torch (skipped when `use_open_clip` is False). A source whose vocabulary is
    larger than `vocab_size_limit` (the text encoders' vocab_size) is skipped. Raises TokenizerUnavailableError.
    """
    if family not in HF_REPOS:
        raise TokenizerUnavailableError(
            f"no tokenizer for model family {family!r}", hint=f"use one of {', '.join(HF_REPOS)}"
        )
    count = len(HF_REPOS[family])
    sources: list[tuple[str, Any]] = []
    if tokenizer_dir is not None:
        sources.append((f"tokenizer_dir {tokenizer_dir}", lambda: _from_dir(Path(tokenizer_dir), count)))
    beside_label = f"the folder beside the checkpoint {beside_dir}"
    if beside_dir is not None and Path(beside_dir).is_dir():
        sources.append((beside_label, lambda: _from_dir(Path(beside_dir), count)))
    sources.append(
        (
            f"Hugging Face cache {_hf_cache_location(hf_cache_dir)}",
            lambda: _from_hf_cache(family, hf_cache_dir),
        )
    )
    if use_open_clip:
        sources.append(("open-clip-torch's CLIP vocabulary", lambda: _from_open_clip(family)))
    tried: list[str] = []
    for label, load in sources:
        try:
            tokenizers = load()
        except Exception as exc:  # the tokenizers library raises bare Exception for malformed files
            tried.append(f"{label}: unreadable ({exc})")
            continue
        if tokenizers is None:
            tried.append(f"{label}: not found")
            continue
        problem = _vocab_problem(tokenizers)
        if problem:
            tried.append(f"{label}: {problem}")
            continue
        size = max(len(tok) for tok in tokenizers)
        if label == beside_label and vocab_size_limit is not None and _foreign(size, vocab_size_limit):
            tried.append(f"{label}: vocabulary of {size} tokens is not the text encoder's {vocab_size_limit}")
            continue
        if vocab_size_limit is not None and size > vocab_size_limit:
            tried.append(
                f"{label}: vocabulary of {size} tokens exceeds the text encoder's {vocab_size_limit}"
            )
            continue
        return tokenizers
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    hint = (
        f"either put the {' and '.join(HF_REPOS[family])} tokenizer files into the Hugging Face cache at "
        f"{_hf_cache_location(hf_cache_dir)}, or run `pip install --no-deps open-clip-torch` (it ships CLIP's "
        "vocabulary), or set tokenizer_cache_dir to a folder with vocab.json and merges.txt"
    )
    if any("exceeds" in reason for reason in tried):
        hint = (
            "the text encoders have a reduced vocabulary (a tiny test model): set tokenizer_cache_dir to a "
            "folder whose vocab.json fits it, or put that folder beside the checkpoint as `tokenizer/`"
        )
    raise TokenizerUnavailableError(
        f"no CLIP tokenizer for {family} is available offline{offline}; tried: " + "; ".join(tried), hint=hint
    )
