"""Device discovery without torch: nvidia-smi's CSV, CUDA_VISIBLE_DEVICES, ROCm, Apple's MPS, the CPU fallback."""

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
    monkeypatch.setattr(devices, "_GPU_DRIVERS", (tmp_path / "no-nvidia", tmp_path / "no-kfd"))
    monkeypatch.setattr(devices, "has_mps", lambda: False)
    detect_gpus.cache_clear()
    try:
        assert detect_gpus() == ()
        assert default_devices() == {"cpu": 1}
    finally:
        detect_gpus.cache_clear()


def test_a_driver_without_nvidia_smi_asks_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ROCm (its /dev/kfd) or an NVIDIA module without its tools: torch, which reports either as CUDA, is asked."""
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "kfd").touch()
    monkeypatch.setattr(devices, "_GPU_DRIVERS", (tmp_path / "no-nvidia", tmp_path / "kfd"))
    rocm = [Gpu(0, "", "AMD Radeon PRO W7900", None)]
    monkeypatch.setattr(devices, "_from_torch", lambda: rocm)
    detect_gpus.cache_clear()
    try:
        assert detect_gpus() == tuple(rocm)
        assert default_devices() == {"cuda:0": 1}
    finally:
        detect_gpus.cache_clear()


def test_apple_silicon_trains_on_mps_and_is_labelled_this_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.has_mps("darwin", "arm64")
    assert not devices.has_mps("darwin", "x86_64")  # an Intel Mac: the pinned torch has no build for it
    assert not devices.has_mps("linux", "arm64") and not devices.has_mps("win32", "arm64")
    gpus = parse_nvidia_smi(SMI)[:2]
    assert devices.default_slots([], mps=True) == {"mps": 1}
    assert devices.default_slots(gpus, mps=True) == {"cuda:0": 1, "cuda:1": 1}  # (an eGPU Mac is no more)
    assert devices.default_slots([], mps=False) == {"cpu": 1}
    assert devices.local_label({"mps": 1}, []) == "this Mac (MPS)"
    assert devices.local_label({"cpu": 1}, []) == "this machine (CPU)"
    assert devices.local_label(["cuda:1"], gpus) == "this machine (NVIDIA GeForce RTX 4090 (24 GB))"
    assert (
        devices.runs_fp16(["mps"]) and devices.runs_fp16(["cuda:0", "cpu"]) and not devices.runs_fp16(["cpu"])
    )
    assert [devices.device_kind(d) for d in ("cuda:3", "mps", "cpu")] == ["cuda", "mps", "cpu"]
    for bad in ("cuda", "cuda:x", "mps:0", "tpu:0"):
        with pytest.raises(ValueError, match="unknown device"):
            devices.device_kind(bad)
    monkeypatch.setattr(devices, "detect_gpus", lambda: ())
    monkeypatch.setattr(devices, "has_mps", lambda: True)
    assert default_devices() == {"mps": 1}


def test_the_training_instance_type_of_a_mac_says_mps(tmp_path: Path) -> None:
    from kohya_backend.service.app import build_service

    service = build_service(tmp_path / "home", devices={"mps": 1})
    try:
        local = {e["name"]: e for e in service.instance_types()}["local"]
        assert local["label"] == "this Mac (MPS)" and local["devices"] == ["mps"]
        assert local["cuda"] is True and service.instance_cuda("local")  # fp16 may be asked for there
    finally:
        service.scheduler.stop()
