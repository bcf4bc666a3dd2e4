"""Per-step caption processing as kohya does it: prefix/suffix, dropout, keep_tokens, shuffle, tag dropout."""

from __future__ import annotations

import random

TAG_SEPARATOR = ","


def _tags(text: str) -> list[str]:
    """Split on "," and strip, dropping empty tags (so "a,,b" does not train on an empty tag)."""
    return [tag.strip() for tag in text.split(TAG_SEPARATOR) if tag.strip()]


def _split_kept(caption: str, keep_tokens: int, separator: str) -> tuple[list[str], list[str], list[str]]:
    """(kept head, shufflable middle, kept tail): by `separator` when the caption has it, else `keep_tokens`."""
    if separator and separator in caption:
        head, rest = caption.split(separator, 1)
        tail = ""
        if separator in rest:
            rest, tail = rest.split(separator, 1)
        return _tags(head), _tags(rest), _tags(tail)
    tags = _tags(caption)
    keep = max(keep_tokens, 0)
    return tags[:keep], tags[keep:], []


def build_caption(
    item_caption: str | None,
    class_token: str,
    *,
    epoch: int,
    rng: random.Random,
    shuffle: bool,
    keep_tokens: int,
    keep_tokens_separator: str = "",
    dropout_rate: float = 0.0,
    dropout_every_n_epochs: int = 0,
    tag_dropout_rate: float = 0.0,
    prefix: str = "",
    suffix: str = "",
) -> str:
    """The caption one image is trained with at this step; `epoch` is 1-based as in kohya.

    Order follows kohya: the image's caption (or the class token), prefix/suffix joined with a
    space, whole-caption dropout ("" when `rng` draws under `dropout_rate` or on every
    `dropout_every_n_epochs`-th epoch), then tags split on "," with the first `keep_tokens` (or the
    part before `keep_tokens_separator`, and after its second occurrence) kept in place while the
    rest is shuffled and each dropped with `tag_dropout_rate`; tags are re-joined with ", ".
    """
    caption = item_caption if item_caption is not None else class_token
    if prefix:
        caption = f"{prefix} {caption}"
    if suffix:
        caption = f"{caption} {suffix}"
    dropped = dropout_rate > 0 and rng.random() < dropout_rate
    if dropped or (dropout_every_n_epochs > 0 and epoch % dropout_every_n_epochs == 0):
        return ""
    has_separator = bool(keep_tokens_separator) and keep_tokens_separator in caption
    if not (shuffle or tag_dropout_rate > 0 or has_separator):
        return caption
    head, middle, tail = _split_kept(caption, keep_tokens, keep_tokens_separator)
    if shuffle:
        rng.shuffle(middle)
    if tag_dropout_rate > 0:
        middle = [tag for tag in middle if rng.random() >= tag_dropout_rate]
    return ", ".join(head + middle + tail)
