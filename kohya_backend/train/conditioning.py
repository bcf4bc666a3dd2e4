"""How each model family conditions its UNet, as small overrides of one base: SD 1.5 and SDXL tokenize, encode,
and call the UNet differently (pooled embeds and time ids for SDXL); the loop is the same for both.

Each override registers under a name of the torch-free family registry (`kohya_backend.families`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kohya_backend.families import FAMILIES

CHUNK = 75  # content tokens per CLIP window (77 with BOS/EOS)


@dataclass
class Conditioning:
    """Text conditioning for a batch: hidden states, and SDXL's pooled embedding."""

    hidden: Tensor
    pooled: Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        pooled = self.pooled.to(device, dtype) if self.pooled is not None else None
        return Conditioning(self.hidden.to(device, dtype), pooled)

    def split(self) -> list[Conditioning]:
        """One Conditioning per sample (for per-caption caching)."""
        n = self.hidden.shape[0]
        return [
            Conditioning(self.hidden[i], self.pooled[i] if self.pooled is not None else None)
            for i in range(n)
        ]

    @staticmethod
    def stack(items: Sequence[Conditioning]) -> Conditioning:
        """Inverse of split: a batch from per-sample items."""
        hidden = torch.stack([c.hidden for c in items])
        pooled = None if items[0].pooled is None else torch.stack([c.pooled for c in items])  # type: ignore[misc]
        return Conditioning(hidden, pooled)


def chunked_token_ids(tokenizer: Any, captions: Sequence[str], max_token_length: int) -> Tensor:
    """Token ids (B, n_chunks * 77): captions cut into 75-token windows, each wrapped as BOS + tokens + EOS + pad.

    max_token_length 75/150/225 gives 1/2/3 windows, as kohya's long-prompt handling does.
    """
    n_chunks = max(1, max_token_length // CHUNK)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for caption in captions:
        ids = tokenizer(caption, add_special_tokens=False, truncation=False)["input_ids"][: n_chunks * CHUNK]
        row: list[int] = []
        for c in range(n_chunks):
            content = ids[c * CHUNK : (c + 1) * CHUNK]
            row += [bos, *content, eos] + [pad] * (CHUNK - len(content))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def _merge_chunks(states: Tensor, batch: int, n_chunks: int) -> Tensor:
    """(B*n, 77, D) -> (B, 75*n + 2, D): first window's BOS, every window's content, last window's EOS."""
    states = states.reshape(batch, n_chunks, states.shape[1], states.shape[2])
    if n_chunks == 1:
        return states[:, 0]
    parts = [states[:, 0, :1]] + [states[:, i, 1:-1] for i in range(n_chunks)] + [states[:, -1, -1:]]
    return torch.cat(parts, dim=1)


def _final_layer_norm(text_encoder: Any) -> torch.nn.Module:
    # transformers 5: CLIPTextModel is the text transformer itself; the projection model still wraps `text_model`.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


class ModelFamily:
    """Base family: subclasses set the registry name and override encoding, UNet kwargs and time ids."""

    name: ClassVar[str]

    def token_ids(
        self, tokenizers: Sequence[Any], captions: Sequence[str], max_token_length: int
    ) -> list[Tensor]:
        """Token ids per tokenizer for a batch of captions."""
        return [chunked_token_ids(tok, captions, max_token_length) for tok in tokenizers]

    def encode(
        self, text_encoders: Sequence[Any], token_ids: Sequence[Tensor], clip_skip: int
    ) -> Conditioning:
        raise NotImplementedError

    def unet_kwargs(self, cond: Conditioning, time_ids: Tensor | None) -> dict[str, Any]:
        """Extra keyword arguments for the UNet call."""
        return {}

    def time_ids(
        self,
        original_sizes: Sequence[tuple[int, int]],
        crops: Sequence[tuple[int, int]],
        target_sizes: Sequence[tuple[int, int]],
    ) -> Tensor | None:
        """The UNet's size/crop conditioning for a batch (images as (h, w), crops as (top, left)); None if unused."""
        return None


class SD15Family(ModelFamily):
    """SD 1.5: CLIP ViT-L last hidden state (or hidden_states[-clip_skip] + final layer norm)."""

    name = "sd_1_5"

    def encode(
        self, text_encoders: Sequence[Any], token_ids: Sequence[Tensor], clip_skip: int
    ) -> Conditioning:
        te = text_encoders[0]
        ids = token_ids[0]
        batch, n_chunks = ids.shape[0], ids.shape[1] // (CHUNK + 2)
        flat = ids.reshape(batch * n_chunks, CHUNK + 2).to(te.device)
        skip = max(1, clip_skip or 1)
        out = te(flat, output_hidden_states=skip > 1)
        hidden = out.last_hidden_state if skip == 1 else _final_layer_norm(te)(out.hidden_states[-skip])
        return Conditioning(_merge_chunks(hidden, batch, n_chunks))


class SDXLFamily(ModelFamily):
    """SDXL: penultimate states of ViT-L and bigG concatenated; pooled = bigG's projected EOS of the first window."""

    name = "sd_xl"

    def encode(
        self, text_encoders: Sequence[Any], token_ids: Sequence[Tensor], clip_skip: int
    ) -> Conditioning:
        te1, te2 = text_encoders
        ids1, ids2 = token_ids
        batch, n_chunks = ids1.shape[0], ids1.shape[1] // (CHUNK + 2)
        flat1 = ids1.reshape(batch * n_chunks, CHUNK + 2).to(te1.device)
        flat2 = ids2.reshape(batch * n_chunks, CHUNK + 2).to(te2.device)
        h1 = te1(flat1, output_hidden_states=True).hidden_states[-2]
        out2 = te2(flat2, output_hidden_states=True)
        h2 = out2.hidden_states[-2]
        hidden = torch.cat(
            [_merge_chunks(h1, batch, n_chunks), _merge_chunks(h2, batch, n_chunks).to(h1.dtype)], -1
        )
        pooled = out2.text_embeds.reshape(batch, n_chunks, -1)[:, 0]
        return Conditioning(hidden, pooled)

    def unet_kwargs(self, cond: Conditioning, time_ids: Tensor | None) -> dict[str, Any]:
        if cond.pooled is None or time_ids is None:
            raise ValueError("SDXL needs pooled text embeddings and time ids")
        return {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids}}

    def time_ids(
        self,
        original_sizes: Sequence[tuple[int, int]],
        crops: Sequence[tuple[int, int]],
        target_sizes: Sequence[tuple[int, int]],
    ) -> Tensor | None:
        return sdxl_time_ids(original_sizes, crops, target_sizes)


def sdxl_time_ids(
    original_sizes: Sequence[tuple[int, int]],
    crops: Sequence[tuple[int, int]],
    target_sizes: Sequence[tuple[int, int]],
) -> Tensor:
    """SDXL's added time ids per sample: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    rows = [[*o, *c, *t] for o, c, t in zip(original_sizes, crops, target_sizes)]
    return torch.tensor(rows, dtype=torch.float32)


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> None:
    """Register a family's conditioning by its registry name; an unknown name or a second registration is an
    error."""
    if family.name not in FAMILIES:
        raise ValueError(f"{family.name!r} is not a model family of kohya_backend.families")
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family


def get_family(name: str) -> ModelFamily:
    """The registered family for an FM type."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown FM type {name!r}; known: {', '.join(sorted(_FAMILIES))}") from None


register_family(SD15Family())
register_family(SDXLFamily())
