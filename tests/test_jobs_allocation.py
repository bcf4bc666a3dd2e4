"""GPUs per job: which devices a job gets (jobs/allocation.py), and the scheduler giving them on machines made up
for the test (the device counts are injected): a 2-GPU job holds two GPUs, counts on both, waits for two free ones
without later jobs overtaking it, and is refused when it asks for more than there are.

The scheduled "trainer" is a stand-in program started by the real local runner (its interpreter prefix): it writes
down the command line and CUDA_VISIBLE_DEVICES it was given, then waits to be cancelled.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs import allocation
from kohya_backend.jobs.devices import device_kind
from kohya_backend.jobs.pool import WorkerState
from kohya_backend.jobs.runner import LocalRunner, trainer_env
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job, JobStore

S = JobStatus
CONFIG = "train_batch_size = 1\n"
_STAND_IN = (
    "import json, os, sys, time; "
    "json.dump({'argv': sys.argv, 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES')}, open('started.json', 'w')); "
    "time.sleep(60)"
)


def _wind_down(sched: Scheduler) -> None:
    """Cancel every running job, tick until none runs (5 s at most), stop the scheduler."""
    for job_id in list(sched.running()):
        sched.cancel(job_id)
    for _ in range(100):
        sched.tick()
        if not sched.running():
            break
        time.sleep(0.05)
    sched.stop()


def test_members_and_groups() -> None:
    assert allocation.members("cuda:0,3") == ["cuda:0", "cuda:3"]
    assert allocation.members("cuda:2") == ["cuda:2"] and allocation.members("cpu") == ["cpu"]
    assert allocation.group(["cuda:1", "cuda:4"]) == "cuda:1,4"
    assert allocation.known("cuda:0,1", {"cuda:0": 1, "cuda:1": 1})
    assert not allocation.known("cuda:0,2", {"cuda:0": 1, "cuda:1": 1})


def test_choose_gives_n_gpus_with_free_slots_or_waits() -> None:
    free = {"cuda:0": 0, "cuda:1": 1, "cuda:2": 1, "cuda:3": 2}
    assert allocation.choose(free, 1, None) == "cuda:3"  # one GPU: the one with the most room
    assert allocation.choose(free, 2, None) == "cuda:1,3"  # the roomiest two (cuda:3 first), in index order
    assert allocation.choose(free, 3, None) == "cuda:1,2,3"
    assert allocation.choose(free, 4, None) is None  # cuda:0 is busy: wait
    assert allocation.choose(free, 1, "cuda:0") is None and allocation.choose(free, 1, "cuda:1") == "cuda:1"
    # No CUDA GPU: N processes on the CPU (gloo), while its slot is free; Apple's MPS never takes N.
    assert allocation.choose({"cpu": 1}, 4, None) == "cpu" and allocation.choose({"cpu": 0}, 2, None) is None
    assert allocation.choose({"mps": 1}, 2, None) is None


def test_processes_for_a_device() -> None:
    assert allocation.processes_for("cuda:0,1,2", 3) == 3
    assert allocation.processes_for("cpu", 2) == 2  # the CPU stands in for 2 GPUs
    assert allocation.processes_for("cuda:1", 1) == allocation.processes_for("mps", 1) == 1


@pytest.mark.parametrize(
    ("devices", "gpus", "pinned", "message"),
    [
        ({"cuda:0": 1, "cuda:1": 1}, 3, None, r"asks for 3 GPUs, but this machine has 2 \(cuda:0, cuda:1\)"),
        ({"cuda:0": 1, "cuda:1": 1}, 2, "cuda:1", "pins device 'cuda:1' and asks for 2 GPUs"),
        ({"mps": 1}, 2, None, "this Mac has one"),
    ],
)
def test_requests_no_machine_here_can_start_are_refused(
    devices: dict[str, int], gpus: int, pinned: str | None, message: str
) -> None:
    with pytest.raises(TrainManagementError, match=message) as caught:
        allocation.check_request(devices, gpus, pinned)
    assert caught.value.hint
    allocation.check_request({"cpu": 1}, 8, None)  # a CPU-only machine runs 8 CPU processes
    allocation.check_request({"cuda:0": 1, "cuda:1": 1}, 2, None)


@pytest.mark.parametrize("value", [0, -1, 2.5, "2", True, 65])
def test_gpus_per_job_is_a_whole_number_from_1(value: object) -> None:
    with pytest.raises(TrainManagementError, match="GPUs per job must be a whole number from 1 to 64"):
        allocation.check_gpus_value(value)
    assert allocation.gpus_of({}) == 1 and allocation.gpus_of({"gpus": 3}) == 3


def test_trainer_env_gives_a_gpu_group_to_the_trainer() -> None:
    env = trainer_env("cuda:0,2", base={})
    assert env["CUDA_VISIBLE_DEVICES"] == "0,2" and env["TRAIN_MANAGEMENT_DEVICE"] == "cuda"
    assert device_kind("cuda:0,2") == device_kind("cuda:1") == "cuda"
    for bad in ("cuda:0,", "cuda:0,x", "cuda:"):
        with pytest.raises(ValueError):
            device_kind(bad)


def _scheduler(home: Path, devices: dict[str, int]) -> Scheduler:
    runner = LocalRunner(python=[sys.executable, "-c", _STAND_IN])
    return Scheduler(JobStore(home), [runner], devices=devices, poll_interval_s=0.05, cancel_grace_s=5)


def _submit(sched: Scheduler, name: str, gpus: int, **params: object) -> Job:
    return sched.submit(
        fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type="local", output_name=name,
        config_toml=CONFIG, params={"gpus": gpus, **params},
    )  # fmt: skip


def _started(job: Job, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    path = job.folder / "started.json"
    while True:
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            assert time.monotonic() < deadline, f"{job.id} did not start"
            time.sleep(0.05)


def test_a_two_gpu_job_holds_two_gpus_and_waits_for_two(tmp_path: Path) -> None:
    sched = _scheduler(tmp_path / "home", {"cuda:0": 1, "cuda:1": 1, "cuda:2": 1})
    try:
        first = _submit(sched, "first", 2)
        sched.tick()
        assert sched.running()[first.id].device == "cuda:0,1"
        started = _started(first)
        assert started["cuda"] == "0,1"  # the trainer sees the two GPUs it was given...
        assert started["argv"][-2:] == ["--num-processes", "2"]  # ...and trains on both
        second = _submit(sched, "second", 2)
        third = _submit(sched, "third", 1)
        sched.tick()
        # One GPU is free: the 2-GPU job waits, and the 1-GPU job behind it does not take that GPU from it.
        assert {j: sched.store.get(j).status for j in (second.id, third.id)} == {
            second.id: S.QUEUED, third.id: S.QUEUED,
        }  # fmt: skip
        sched.cancel(first.id)
        deadline = time.monotonic() + 20
        while sched.store.get(third.id).status is S.QUEUED:
            assert time.monotonic() < deadline
            sched.tick()
            time.sleep(0.05)
        assert sched.store.get(first.id).status is S.CANCELLED
        running = {job_id: handle.device for job_id, handle in sched.running().items()}
        assert running == {second.id: "cuda:0,1", third.id: "cuda:2"}
        assert "--num-processes" not in _started(sched.store.get(third.id))["argv"]  # one GPU: no launcher
        with pytest.raises(TrainManagementError, match=r"asks for 4 GPUs, but this machine has 3"):
            _submit(sched, "fourth", 4)
        with pytest.raises(TrainManagementError, match="pins device"):
            _submit(sched, "pinned", 2, device="cuda:1")
    finally:
        _wind_down(sched)


def test_a_cpu_only_machine_runs_the_processes_on_its_cpu(tmp_path: Path) -> None:
    sched = _scheduler(tmp_path / "home", {"cpu": 1})
    try:
        job = _submit(sched, "cpu", 3)
        sched.tick()
        started = _started(job)
        assert started["cuda"] == "" and started["argv"][-2:] == ["--num-processes", "3"]
    finally:
        _wind_down(sched)


def test_a_worker_takes_a_job_only_with_enough_gpus() -> None:
    gpu = {"name": "A10G", "vram_bytes": 24 * 2**30}
    four = WorkerState("four", "online", {"slots": 1, "gpus": [gpu] * 4})
    one = WorkerState("one", "online", {"slots": 1, "gpus": [gpu]})
    cpu = WorkerState("cpu", "online", {"slots": 1, "gpus": []})
    assert four.gpu_count() == 4 and four.can_take("sd_1_5", {"gpus": 4}, 0)
    assert not one.can_take("sd_1_5", {"gpus": 2}, 0) and one.can_take("sd_1_5", {}, 0)
    assert cpu.can_take("sd_1_5", {"gpus": 2}, 0)  # a worker without GPUs runs the processes on its CPU
