"""Process tuning helpers: allocator settings apply, and released weight pages really leave the RSS."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kohya_backend.train.runtime import release_pages, tune_allocator

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc/Linux only")


@linux
def test_tune_allocator_applies() -> None:
    assert tune_allocator() is True


@linux
def test_release_pages_drops_resident_mapped_weights(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    original = torch.randn(64, 1024, 1024)  # 256 MiB
    save_file({"w": original}, str(path))
    with safe_open(str(path), "pt") as fh:
        mapped = fh.get_tensor("w")
    module = torch.nn.Module()
    module.register_buffer("w", mapped)
    proc = psutil.Process()
    checksum = float(mapped.sum())  # touches every page
    before = proc.memory_info().rss
    released = release_pages(module)
    after = proc.memory_info().rss
    assert released > 200 * 2**20
    assert before - after > 150 * 2**20
    assert float(mapped.sum()) == checksum  # file-backed pages come back from the file when read again
