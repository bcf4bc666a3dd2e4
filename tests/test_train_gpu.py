"""Mixed precision and memory on CUDA (marked `gpu`, skipped without a CUDA device): what a GPU task checks with
`pytest -m gpu` (and `bench/train_bench.py --setting full|sdxl` for the speed and memory figures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_loop import assets, eval_loss, make_config, run  # noqa: F401 (the module-scoped fixture)

from kohya_backend.lora.save import load_lora
from kohya_backend.train.events import read_events

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("fm", ["sd_1_5", "sd_xl"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_learns_and_saves_on_cuda(
    assets,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    fm: str,
    precision: str,
) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo --w 64 --h 64 --s 2\n")
    config = make_config(
        assets,
        tmp_path,
        fm,
        max_train_steps=60,
        unet_lr=1e-2,
        text_encoder_lr=1e-3,
        cache_latents=True,
        mixed_precision=precision,
        no_half_vae=True,
        save_precision="fp16",
        sample_prompts=str(prompts),  # sampling keeps the VAE loaded after caching, so its dtype can be seen
        sample_every_n_steps=60,
    )
    trainer, result = run(config, tmp_path / "events.jsonl")
    assert result.step == 60 and result.output is not None
    assert trainer.s.model.unet.dtype == (torch.float16 if precision == "fp16" else torch.bfloat16)
    assert trainer.s.model.vae.dtype == torch.float32  # no_half_vae
    assert list((tmp_path / "sample").glob("*.png"))
    assert eval_loss(fm, assets, result.output) < eval_loss(fm, assets, None) * 0.95
    saved, _ = load_lora(result.output)
    assert all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in saved.values())
    done = next(e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "done")
    assert isinstance(done["peak_cuda_gb"], float) and done["peak_cuda_gb"] > 0


def test_gradient_checkpointing_lowers_peak_cuda_memory(
    assets,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    peaks = {}
    for checkpointing in (True, False):  # the larger run last: a peak carried over could only hide the gain
        out = tmp_path / str(checkpointing)
        config = make_config(
            assets,
            out,
            "sd_xl",
            max_train_steps=2,
            resolution="256,256",  # activations, not the tiny weights, make the peak
            train_batch_size=4,
            mixed_precision="bf16",
            gradient_checkpointing=checkpointing,
        )
        trainer, _ = run(config, out / "events.jsonl")
        assert trainer.s.model.unet.is_gradient_checkpointing is checkpointing
        done = next(e for e in read_events(out / "events.jsonl") if e["kind"] == "done")
        peaks[checkpointing] = done["peak_cuda_gb"]
    assert peaks[True] < peaks[False] * 0.9
