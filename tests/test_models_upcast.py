"""Kept fp16 frozen weights upcast once when the measured peak leaves room: the choice's arithmetic, the override,
and a model that trains exactly as before once its weights are upcast in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kohya_backend.assets.checkpoints import write_checkpoint
from kohya_backend.assets.tokenizer import write_tiny_tokenizer
from kohya_backend.errors import ModelError
from kohya_backend.models.frozen import _BUFFERS, route_frozen_layers
from kohya_backend.models.load import load_checkpoint
from kohya_backend.models.upcast import (
    MARGIN_MIN,
    MODE_ENV,
    KeptWeight,
    MemoryFacts,
    choose_upcast,
    kept_weights,
    memory_facts,
    upcast_mode,
    upcast_weights,
)
from tests.test_models_frozen import _lora_step

GIB = 2**30


def _kept(numel: int, dtype: torch.dtype = torch.float16) -> list[KeptWeight]:
    """A kept weight of `numel` elements (on the meta device: only its size counts here)."""
    return [KeptWeight(nn.Module(), "weight", torch.empty(numel, dtype=dtype, device="meta"))]


def test_upcast_when_the_copies_and_the_steps_rise_fit_beside_the_margin() -> None:
    kept = _kept(1000)  # 2000 bytes stored, 4000 as fp32
    total = 8 * GIB  # margin: the 1 GiB floor (10% is 0.8 GiB)
    facts = MemoryFacts(available=MARGIN_MIN + 4000 + 500, total=total, rss=10_000, peak_rss=10_500)
    choice = choose_upcast(kept, facts)
    assert choice.upcast and choice.mode == "auto"
    assert (choice.stored_bytes, choice.fp32_bytes, choice.needed, choice.margin) == (2000, 4000, 4500, GIB)
    assert choice.estimated_peak == 10_500 + 4000 - 2000  # the kept weights' file pages are given back
    # one byte short: the step's rise above RSS now counts too
    short = MemoryFacts(available=MARGIN_MIN + 4000 + 499, total=total, rss=10_000, peak_rss=10_500)
    assert not choose_upcast(kept, short).upcast
    # on a large machine the margin is a tenth of its memory
    big = MemoryFacts(available=int(6.4 * GIB) + 4000, total=64 * GIB, rss=1, peak_rss=1)
    assert choose_upcast(kept, big).margin == int(6.4 * GIB) and choose_upcast(kept, big).upcast
    smaller = MemoryFacts(available=int(6.4 * GIB) + 3999, total=64 * GIB, rss=1, peak_rss=1)
    assert not choose_upcast(kept, smaller).upcast
    bf16 = choose_upcast(_kept(1000, torch.bfloat16), facts)
    assert (bf16.stored_bytes, bf16.fp32_bytes) == (2000, 4000)
    # two data-parallel processes on this machine each make the copies and the rise
    pair = MemoryFacts(available=MARGIN_MIN + 2 * 4500, total=total, rss=10_000, peak_rss=10_500)
    assert (
        choose_upcast(kept, pair, processes=2).upcast
        and choose_upcast(kept, pair, processes=2).needed == 9000
    )
    half = MemoryFacts(available=MARGIN_MIN + 2 * 4500 - 1, total=total, rss=10_000, peak_rss=10_500)
    assert choose_upcast(kept, half).upcast and not choose_upcast(kept, half, processes=2).upcast


def test_the_override_wins_and_the_message_gives_the_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    kept = _kept(500_000_000 // 2)  # 0.5 GB stored
    roomy = MemoryFacts(available=100 * GIB, total=128 * GIB, rss=GIB, peak_rss=2 * GIB)
    tight = MemoryFacts(available=GIB, total=16 * GIB, rss=GIB, peak_rss=GIB)
    assert not choose_upcast(kept, roomy, "keep").upcast
    assert choose_upcast(kept, tight, "upcast").upcast
    text = choose_upcast(kept, roomy).message()
    assert text.startswith("upcast 0.50 GB of fp16/bf16 frozen weights to fp32 once (1.00 GB;")
    assert "later steps skip the per-layer upcast" in text and MODE_ENV not in text
    kept_text = choose_upcast(kept, tight).message()
    assert kept_text.startswith("kept 0.50 GB of fp16/bf16 frozen weights as stored (")
    assert f"{GIB / 1e9:.2f} GB available" in kept_text and "0.50 GB less memory" in kept_text
    assert f"{MODE_ENV}=keep" in choose_upcast(kept, roomy, "keep").message()
    fields = choose_upcast(kept, tight).event_fields()
    assert fields["choice"] == "kept" and fields["fp32_gb"] == 1.0 and fields["message"] == kept_text

    monkeypatch.delenv(MODE_ENV, raising=False)
    assert upcast_mode() == "auto"
    monkeypatch.setenv(MODE_ENV, " Keep ")
    assert upcast_mode() == "keep"
    monkeypatch.setenv(MODE_ENV, "always")
    with pytest.raises(ModelError, match=f"{MODE_ENV}='always' is not one of auto, upcast, keep"):
        upcast_mode()


def test_memory_facts_read_this_process_and_its_peak() -> None:
    before = memory_facts()
    assert 0 < before.available <= before.total and before.peak_rss >= before.rss > 0
    grown = torch.ones(256 * 2**20 // 4)  # 256 MiB written: RSS and its peak rise
    during = memory_facts()
    assert during.rss - before.rss >= 200 * 2**20 and during.peak_rss >= during.rss
    del grown  # given back: RSS falls, the peak stays
    after = memory_facts()
    assert after.rss < during.rss - 200 * 2**20 and after.peak_rss >= before.rss + 200 * 2**20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("family", ["sd_1_5", "sd_xl"])
def test_a_model_upcast_in_place_trains_exactly_as_with_its_kept_weights(
    tmp_path: Path, tok_dir: Path, family: str
) -> None:
    """The same loaded model, before and after its kept weights are upcast (and their file pages released)."""
    path = write_checkpoint(tmp_path / "half.safetensors", family, size="tiny", dtype=torch.float16, seed=3)
    model = load_checkpoint(path, family, tokenizer_dir=tok_dir, keep_file_precision=True)
    modules = [model.unet, model.vae, *model.text_encoders]
    for module in modules:
        route_frozen_layers(module)
    kept = kept_weights(modules)
    assert kept and all(w.tensor.dtype == torch.float16 for w in kept)
    loss, grads = _lora_step(model, family)
    assert _BUFFERS.by_kind  # the kept layers upcast through the buffer

    copied = upcast_weights(kept, release_pages=True)
    assert copied == 4 * sum(w.tensor.numel() for w in kept)
    assert not kept_weights(modules) and not _BUFFERS.by_kind
    assert all(not p.requires_grad for m in modules for p in m.parameters())
    again, again_grads = _lora_step(model, family)
    assert not _BUFFERS.by_kind  # nothing left to upcast per call
    assert torch.equal(loss, again)
    assert grads.keys() == again_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, again_grads[name]), name


def test_kept_weights_are_the_cpu_fp16_and_bf16_parameters_only() -> None:
    fp16 = nn.Linear(4, 4).half()
    bf16 = nn.Conv2d(2, 2, 1).bfloat16()
    fp32 = nn.Linear(4, 4)
    gone = nn.Linear(4, 4, device="meta").half()  # a module dropped after caching
    found = kept_weights([nn.Sequential(fp16, bf16, fp32, gone)])
    assert [(id(w.module), w.name) for w in found] == [
        (id(fp16), "weight"),
        (id(fp16), "bias"),
        (id(bf16), "weight"),
        (id(bf16), "bias"),
    ]
