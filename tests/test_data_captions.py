"""Caption processing: class token fallback, prefix/suffix, keep_tokens, separator, shuffle and dropouts."""

from __future__ import annotations

import random
from typing import Any

from kohya_backend.data.captions import build_caption

CAPTION = "sks, red hair, smile, outdoors, looking at viewer, sky"


def _build(caption: str | None = CAPTION, *, seed: int = 0, epoch: int = 1, **options: Any) -> str:
    settings: dict[str, Any] = {"shuffle": False, "keep_tokens": 0}
    settings.update(options)
    return build_caption(caption, "sks person", epoch=epoch, rng=random.Random(seed), **settings)


def test_plain_caption_and_class_token_fallback() -> None:
    assert _build() == CAPTION
    assert _build(None) == "sks person"
    assert _build("  spaced ,  as written ") == "  spaced ,  as written "


def test_prefix_and_suffix_are_joined_with_a_space() -> None:
    assert _build("a, b", prefix="photo of,", suffix=", 4k") == "photo of, a, b , 4k"


def test_shuffle_keeps_the_first_tokens_and_every_tag() -> None:
    tags = [t.strip() for t in CAPTION.split(",")]
    results = {_build(seed=seed, shuffle=True, keep_tokens=2) for seed in range(20)}
    assert len(results) > 5
    for result in results:
        out = result.split(", ")
        assert out[:2] == ["sks", "red hair"] and sorted(out) == sorted(tags)
    assert _build(seed=3, shuffle=True, keep_tokens=2) == _build(seed=3, shuffle=True, keep_tokens=2)


def test_keep_tokens_separator_fixes_head_and_tail() -> None:
    caption = "sks, 1girl ||| smile, sky, tree ||| masterpiece, best"
    for seed in range(10):
        out = _build(caption, seed=seed, shuffle=True, keep_tokens=5, keep_tokens_separator="|||").split(", ")
        assert out[:2] == ["sks", "1girl"] and out[-2:] == ["masterpiece", "best"]
        assert sorted(out[2:5]) == ["sky", "smile", "tree"]
    # the separator never reaches the text encoder, even without shuffling
    assert _build(caption, keep_tokens_separator="|||") == "sks, 1girl, smile, sky, tree, masterpiece, best"


def test_caption_dropout_rate_and_every_n_epochs() -> None:
    assert _build(dropout_rate=1.0) == ""
    dropped = sum(_build(seed=seed, dropout_rate=0.3) == "" for seed in range(400))
    assert 80 < dropped < 160
    assert [_build(epoch=epoch, dropout_every_n_epochs=2) == "" for epoch in (1, 2, 3, 4)] == [
        False,
        True,
        False,
        True,
    ]


def test_tag_dropout_spares_kept_tokens() -> None:
    assert _build(keep_tokens=1, tag_dropout_rate=1.0) == "sks"
    lengths = {len(_build(seed=seed, keep_tokens=1, tag_dropout_rate=0.5).split(", ")) for seed in range(30)}
    assert min(lengths) >= 1 and len(lengths) > 2
    assert _build("a,, b ,", tag_dropout_rate=0.0, shuffle=True, seed=1).count(",") == 1
