"""Stand-ins for a home's inputs in the tests that never load a model: a checkpoint that is only recognised (its
key names say SD 1.5) and a small captioned kohya dataset folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

# Enough key names for models/detect to call a file SD 1.5; the values are never read.
SD15_KEYS = ("model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x")


def stub_sd15(path: Path) -> Path:
    """A .safetensors file detected as SD 1.5 (tiny zero tensors under SD15_KEYS)."""
    save_file({k: np.zeros((2, 2), np.float16) for k in SD15_KEYS}, str(path))
    return path


def stub_dataset(folder: Path, count: int = 2, caption: str | None = "a cat") -> Path:
    """`count` distinct 64 px images in `folder` (a <repeats>_<name> folder), each with a caption file unless None."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (i * 90 % 256, 10, 10)).save(folder / f"{i}.png")
        if caption is not None:
            (folder / f"{i}.txt").write_text(caption, encoding="utf-8")
    return folder
