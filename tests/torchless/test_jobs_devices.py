"""GPU discovery without torch: nvidia-smi's CSV, CUDA_VISIBLE_DEVICES, and the CPU fallback."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kohya_backend.jobs import devices
from kohya_backend.jobs.devices import Gpu, detect_gpus, parse_nvidia_smi, visible
from kohya_backend.jobs.scheduler import default_devices

SMI = """0, GPU-aaaa1111-0000, NVIDIA H200, 143771
1, GPU-bbbb2222-0000, NVIDIA GeForce RTX 4090, 24564
2, GPU-cccc3333-0000, Quadro RTX 8000, Founders, [N/A]
garbage line
"""


def test_parse_nvidia_smi() -> None:
    gpus = parse_nvidia_smi(SMI)
    assert [g.index for g in gpus] == [0, 1, 2]
    assert gpus[0] == Gpu(0, "GPU-aaaa1111-0000", "NVIDIA H200", 143771)
    assert gpus[0].label == "NVIDIA H200 (140 GB)" and gpus[0].device == "cuda:0"
    assert gpus[2].name == "Quadro RTX 8000, Founders" and gpus[2].memory_mib is None
    assert gpus[2].label == "Quadro RTX 8000, Founders"


@pytest.mark.parametrize(
    ("spec", "indices"),
    [
        (None, [0, 1, 2]),
        ("", []),
        ("-1", []),
        ("2,0", [2, 0]),
        ("1,7,0", [1]),
        ("GPU-bbbb", [1]),
        ("0,0", [0]),
    ],
)
def test_cuda_visible_devices(spec: str | None, indices: list[int]) -> None:
    assert [g.index for g in visible(parse_nvidia_smi(SMI), spec)] == indices


def _fake_smi(folder: Path, text: str) -> None:
    """An nvidia-smi stand-in on PATH that prints what the real one prints for the query."""
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n/bin/cat <<'OUT'\n{text}OUT\n", encoding="utf-8")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_detect_gpus_reads_nvidia_smi_and_the_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_smi(tmp_path, SMI)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    detect_gpus.cache_clear()
    try:
        assert [g.name for g in detect_gpus()] == ["NVIDIA GeForce RTX 4090"]
        assert default_devices() == {"cuda:1": 1}
    finally:
        detect_gpus.cache_clear()


def test_no_driver_means_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(devices, "_NVIDIA_DRIVER", tmp_path / "no-driver")
    detect_gpus.cache_clear()
    try:
        assert detect_gpus() == ()
        assert default_devices() == {"cpu": 1}
    finally:
        detect_gpus.cache_clear()
