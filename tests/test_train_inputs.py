"""The text conditioning cache: bounded in memory, reused from disk only under the same fingerprint."""

from __future__ import annotations

from pathlib import Path

import torch

from kohya_backend.train.conditioning import Conditioning
from kohya_backend.train.inputs import TextCache

ROW_BYTES = 4 * 8 * 4  # one caption: (4, 8) float32


def _encoder(calls: list[list[str]]):
    def encode(captions: list[str]) -> Conditioning:
        calls.append(list(captions))
        return Conditioning(torch.stack([torch.full((4, 8), float(len(c))) for c in captions]))

    return encode


def test_a_bounded_cache_drops_the_least_recently_used_captions() -> None:
    calls: list[list[str]] = []
    cache = TextCache(max_bytes=3 * ROW_BYTES)
    encode = _encoder(calls)
    out = cache.conditioning(["a", "bb", "a"], encode)
    assert calls == [["a", "bb"]] and out.hidden.shape == (3, 4, 8) and out.hidden[2, 0, 0] == 1.0
    cache.conditioning(["ccc", "a"], encode)  # "a" is used again: "bb" is now the oldest
    cache.conditioning(["dddd"], encode)
    assert len(cache) == 3 and cache.nbytes == 3 * ROW_BYTES
    cache.conditioning(["a", "ccc", "dddd"], encode)
    cache.conditioning(["bb"], encode)
    assert calls[-1] == ["bb"] and len(calls) == 4  # only the dropped caption was encoded again


def test_a_batch_larger_than_the_budget_still_comes_back_whole() -> None:
    cache = TextCache(max_bytes=ROW_BYTES)
    out = cache.conditioning(["a", "bb", "ccc"], _encoder([]))
    assert [float(v) for v in out.hidden[:, 0, 0]] == [1.0, 2.0, 3.0] and len(cache) == 1


def test_disk_entries_are_reused_only_under_the_same_fingerprint(tmp_path: Path) -> None:
    calls: list[list[str]] = []
    TextCache(disk_dir=tmp_path, fingerprint="m|clip_skip=1").conditioning(["a", "bb"], _encoder(calls))
    again = TextCache(disk_dir=tmp_path, fingerprint="m|clip_skip=1")
    out = again.conditioning(["bb", "a"], _encoder(calls))
    assert calls == [["a", "bb"]] and again.loaded_from_disk == 2
    assert [float(v) for v in out.hidden[:, 0, 0]] == [2.0, 1.0]
    other = TextCache(disk_dir=tmp_path, fingerprint="m|clip_skip=2")
    other.conditioning(["a"], _encoder(calls))
    assert calls[-1] == ["a"] and other.loaded_from_disk == 0
    next(tmp_path.glob("*.safetensors")).write_bytes(b"broken")
    fresh = TextCache(disk_dir=tmp_path, fingerprint="m|clip_skip=1")
    fresh.conditioning(["a", "bb"], _encoder(calls))
    assert fresh.loaded_from_disk == 1 and len(calls[-1]) == 1  # the damaged entry was encoded again
