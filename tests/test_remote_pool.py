"""How the pool reads a worker's info (free slots, VRAM, what a job needs, labels) and keeps its clients."""

from __future__ import annotations

from pathlib import Path

import pytest
from remote_support import TOKEN, WorkerThread

from kohya_backend.jobs.pool import WorkerPool, WorkerState, required_vram_gb
from kohya_backend.jobs.registry import WorkerRegistry
from kohya_backend.service.worker import build_worker

GIB = 2**30


def test_free_slots_count_the_workers_load_and_the_jobs_sent_from_here() -> None:
    state = WorkerState("a", "online", {"slots": 2, "active_jobs": 1, "queued_jobs": 0})
    assert state.free_slots(0) == 1
    assert state.free_slots(2) == 0  # two of ours still uploading: the worker does not know them yet
    assert WorkerState("b", "online", {"slots": 1, "active_jobs": 0, "queued_jobs": 1}).free_slots(0) == 0


def test_vram_is_the_largest_gpu_and_unknown_on_a_cpu_worker() -> None:
    gpus = [
        {"index": 0, "name": "RTX 3060", "vram_bytes": 12 * GIB},
        {"index": 1, "name": "A100", "vram_bytes": 80 * GIB},
    ]
    state = WorkerState("a", "online", {"gpus": gpus})
    assert state.vram_gb() == 80 and state.gpu_label() == "RTX 3060 (12 GB), A100 (80 GB)"
    assert WorkerState("c", "online", {"gpus": []}).vram_gb() is None
    assert WorkerState("c", "online", {"gpus": []}).gpu_label() == "CPU"
    assert WorkerState("d").gpu_label() == "?"
    unknown = WorkerState("e", "online", {"gpus": [{"name": "GPU", "vram_bytes": None}]})
    assert unknown.vram_gb() is None and unknown.gpu_label() == "GPU"
    assert state.has_cuda() is True and unknown.has_cuda() is True
    assert WorkerState("c", "online", {"gpus": []}).has_cuda() is False
    assert WorkerState("d").has_cuda() is None  # not heard from yet


def test_a_job_needs_its_familys_minimum_unless_it_asks_for_more() -> None:
    assert required_vram_gb("sd_1_5", {}) == 6.0
    assert required_vram_gb("sd_xl", {}) == 12.0
    assert required_vram_gb("sd_xl", {"min_vram_gb": 24}) == 24.0
    assert required_vram_gb("sd_xl", {"min_vram_gb": True}) == 12.0
    public = WorkerState("a", "busy", {"slots": 1, "free_disk_bytes": 100 * GIB}).public()
    assert public["state"] == "busy" and public["free_disk_gb"] == 100 and "token" not in public


def test_the_pool_keeps_one_client_per_worker_until_its_url_or_token_changes(tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path / "home")
    pool = WorkerPool(registry, refresh_s=3600)
    try:
        with WorkerThread(build_worker(tmp_path / "worker", devices={"cpu": 1})) as served:
            entry = registry.add(served.url, TOKEN, name="w")
            pool.refresh()
            kept = pool.client(entry)
            pool.refresh()  # the next round asks through the same client (its connection stays open)
            assert pool.client(entry) is kept and pool.states()["w"].state == "online"
            changed = registry.add(served.url, "another-token-0123456789")
            pool.refresh()
            assert pool.states()["w"].state == "unauthorized" and pool.client(changed) is not kept
            with pytest.raises(RuntimeError, match="closed"):
                kept.info()  # the old token's client was closed when it was replaced
            replaced = pool.client(changed)
            registry.remove("w")
            pool.refresh()
            with pytest.raises(RuntimeError, match="closed"):
                replaced.info()  # a removed worker's client goes with it
    finally:
        pool.close()
