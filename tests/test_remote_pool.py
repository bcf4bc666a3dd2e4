"""How the pool reads a worker's info: free slots, VRAM, what a job needs, how a worker is labelled."""

from __future__ import annotations

from kohya_backend.jobs.pool import WorkerState, required_vram_gb

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
