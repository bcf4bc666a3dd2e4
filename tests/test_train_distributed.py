"""Data-parallel training for real: several trainer processes (gloo on this CPU) on the tiny demo model.

Two processes of batch 1 train the LoRA one process of batch 2 trains; a job given two "GPUs" (CPU processes here)
is cancelled and resumed in one process over uneven buckets; a process killed with -9 ends its job; and kohya
users' `accelerate launch` form trains too. Each run is a few steps at 64 px.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import tomlkit
import torch
from jobs_support import config_without_name, tick_until

import kohya_backend
from kohya_backend.assets.checkpoints import write_checkpoint
from kohya_backend.assets.dataset import write_demo_dataset
from kohya_backend.config.parse import parse_config
from kohya_backend.config.validate import validate_config
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job
from kohya_backend.lora.save import load_lora
from kohya_backend.train.events import EventLog, read_events
from kohya_backend.train.loop import train

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the process-group checks are POSIX")
S = JobStatus
ROOT = Path(kohya_backend.__file__).resolve().parent.parent


def _cli(
    args: list[str], cwd: Path, *, launcher: list[str] | None = None, threads: int | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [*(launcher or [sys.executable, "-m"]), "kohya_backend", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _config(base: str, **changes: object) -> str:
    doc = tomlkit.parse(base)
    for key, value in changes.items():
        doc[key] = value
    return tomlkit.dumps(doc)


def _launch_line(job: Job) -> tuple[list[int], int]:
    """The worker pids and the rendezvous port the launcher logged."""
    text = (job.folder / "train.log").read_text(encoding="utf-8")
    found = re.search(r"training processes \(pids ([\d, ]+)\), rendezvous on 127\.0\.0\.1:(\d+)", text)
    assert found, text
    return [int(p) for p in found.group(1).split(", ")], int(found.group(2))


def _nothing_left(pgid: int, pids: list[int], port: int) -> None:
    """No process of the job's group runs (the launcher and every worker ended), and the port is free."""
    deadline = time.monotonic() + 10
    while True:
        left = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(proc.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"processes of the job's group still run: {left}"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # raises if the rendezvous still listened


def _submit(sched: Scheduler, name: str, config: str, gpus: int) -> Job:
    return sched.submit(
        fm_type="sd_1_5",
        model="demo-sd_1_5.safetensors",
        dataset="demo",
        instance_type="local",
        output_name=name,
        config_toml=config,
        params={"gpus": gpus},
    )


def test_two_processes_of_batch_1_train_the_lora_one_process_of_batch_2_trains(
    tmp_path: Path, demo_config: str
) -> None:
    """The same global batches (one image, twice per epoch) and the same noise per sample: two processes that each
    take one image and average their gradients (DDP) end where one process with both images ends. SGD (not Adam,
    which hides a gradient twice too large) makes a sum instead of a mean show. The base model is an fp16 file: its
    frozen weights are kept in fp16 for the first step, then upcast or kept in every process as rank 0 decides
    (one "weights" event; a process that did not take part in the broadcast would hang the run)."""
    data = write_demo_dataset(tmp_path / "one", folder="2_one", count=1)
    half = write_checkpoint(tmp_path / "half.safetensors", "sd_1_5", size="tiny", dtype=torch.float16, seed=0)
    common = {
        "pretrained_model_name_or_path": half.as_posix(),
        "train_data_dir": data.as_posix(),
        "max_train_steps": 3,
        "optimizer_type": "SGDNesterov",
        "learning_rate": 2.0,
        "unet_lr": 2.0,
        "text_encoder_lr": 1.0,
        "save_precision": "float",
        "seed": 7,
    }
    single = _config(demo_config, **common, output_dir=(tmp_path / "single").as_posix(), train_batch_size=2)
    # One thread on both sides: with more, a batch of 2 and a batch of 1 split their matmuls differently and the
    # sums round differently (beyond 1e-6 after 3 SGD steps at these learning rates).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(validate_config(parse_config(single), "sd_1_5"), events=EventLog(None, console=None))
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "two.toml").write_text(
        _config(demo_config, **common, output_dir=(tmp_path / "two").as_posix(), train_batch_size=1)
    )
    events = tmp_path / "two.jsonl"
    done = _cli(
        ["train", "--config", "two.toml", "--num-processes", "2", "--events", str(events)],
        tmp_path,
        threads=1,
    )
    assert done.returncode == 0, done.stderr
    weights = [e for e in read_events(events) if e["kind"] == "weights"]
    assert [(e["choice"], e["mode"]) for e in weights] == [("upcast", "auto")], weights  # rank 0's, once
    assert [(e["kind"], e.get("step")) for e in read_events(events) if e["kind"] in ("step", "weights")] == [
        ("step", 1), ("weights", None), ("step", 2), ("step", 3),
    ]  # fmt: skip
    assert "data-parallel training in 2 processes (gloo): train_batch_size 1 per process" in done.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["demo-sd_1_5.safetensors"]  # one LoRA
    expected, _ = load_lora(tmp_path / "single" / "demo-sd_1_5.safetensors")
    got, metadata = load_lora(tmp_path / "two" / "demo-sd_1_5.safetensors")
    assert got.keys() == expected.keys()
    ups = [k for k in got if k.endswith("lora_up.weight")]
    assert sum(float(got[k].abs().sum()) for k in ups) > 1e-3  # it trained (lora_up starts at zero)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    # kohya's metadata with 2 processes: batches per epoch per process, the total batch over both
    assert metadata["ss_num_batches_per_epoch"] == "1" and metadata["ss_steps"] == "3"
    assert (metadata["ss_batch_size_per_device"], metadata["ss_total_batch_size"]) == ("1", "2")


def test_a_job_on_two_processes_is_cancelled_cleanly_and_resumes_in_one(
    tmp_path: Path, demo_config: str, make_scheduler: Callable[..., Scheduler]
) -> None:
    """Uneven buckets (15 wide and 10 tall items, batch 1: 25 batches, 13 rounds of 2): no process waits on
    another. The cancel reaches every process (the group's SIGTERM, and the launcher's again): all stop at the same
    batch, rank 0 saves, nothing is left running. The state counts batches: one process goes on with the rest."""
    data = tmp_path / "uneven"
    write_demo_dataset(data, folder="5_wide", count=3, size=(128, 64), seed=1)
    write_demo_dataset(data, folder="5_tall", count=2, size=(64, 128), seed=2)
    sched = make_scheduler(tmp_path / "home")  # one CPU slot, standing in for 2 GPUs
    config = config_without_name(
        demo_config, train_data_dir=data.as_posix(), resolution="128,64", enable_bucket=True,
        min_bucket_reso=64, max_bucket_reso=128, train_batch_size=1, max_train_epochs=2, save_state=True,
        cache_latents_to_disk=True,  # rank 0 writes the cache, the other waits and reads it
    )  # fmt: skip
    job = _submit(sched, "uneven", config, gpus=2)
    tick_until(sched, lambda: sched.store.get(job.id).status is S.TRAINING, timeout=120)
    pids, port = _launch_line(sched.store.get(job.id))
    assert len(pids) == 2
    assert sched.cancel(job.id).status is S.CANCELLING
    tick_until(sched, lambda: sched.store.get(job.id).status.is_terminal, timeout=120)
    job = sched.store.get(job.id)
    result = json.loads((job.folder / "result.json").read_text(encoding="utf-8"))
    assert job.status is S.CANCELLED and result["status"] == "stopped", job.reason
    stopped_at = int(result["step"])
    assert job.reason == f"cancelled at step {stopped_at}; its state is saved, so resume continues from it"
    assert 0 < stopped_at < 26  # 13 steps per epoch with 2 processes, 2 epochs
    _nothing_left(job.pgid or 0, pids, port)
    log = (job.folder / "train.log").read_text(encoding="utf-8")
    assert "data-parallel training in 2 processes (gloo)" in log and "Traceback" not in log
    assert len(list(data.glob("*/.latent_cache/*.safetensors"))) == 5  # one per image, written once

    state = sorted((job.folder / "output" / "uneven-state").glob("state-*"))[-1]
    saved = json.loads((state / "train_state.json").read_text(encoding="utf-8"))
    assert saved["step"] == stopped_at and saved["extra"]["world_size"] == 2
    epoch, batches_done = saved["epoch"], saved["batches_done_in_epoch"]
    assert batches_done in (0, min(25, 2 * (stopped_at - 13 * (epoch - 1))))  # batches, not steps, are kept

    done = _cli(["train", "--job", str(job.folder), "--resume", "--fm-type", "sd_1_5"], tmp_path)
    assert done.returncode == 0, done.stderr
    events = read_events(job.folder / "events.jsonl")
    replanned = [e["message"] for e in events if "saved by 2 process" in str(e.get("message"))]
    # One process: the batches left in the stopped epoch are a step each, then 25 steps per epoch.
    total = stopped_at + (25 - batches_done if batches_done else 0) + 25 * (2 - epoch)
    assert replanned == [
        f"the state was saved by 2 process(es); training goes on with 1, {total} steps in all"
    ]
    steps = [e["step"] for e in events if e["kind"] == "step"]
    assert steps[-(total - stopped_at) :] == list(range(stopped_at + 1, total + 1))
    _, metadata = load_lora(job.folder / "output" / "uneven.safetensors")
    assert (metadata["ss_steps"], metadata["ss_epoch"], metadata["ss_num_batches_per_epoch"]) == (
        str(total), "2", "25",
    )  # fmt: skip


def test_kill_9_of_one_process_ends_the_job_and_leaves_nothing_running(
    tmp_path: Path, demo_config: str, make_scheduler: Callable[..., Scheduler]
) -> None:
    sched = make_scheduler(tmp_path / "home")
    job = _submit(sched, "killed", config_without_name(demo_config, max_train_steps=500), gpus=2)
    tick_until(sched, lambda: sched.store.get(job.id).status is S.TRAINING, timeout=120)
    pids, port = _launch_line(sched.store.get(job.id))
    os.kill(pids[1], signal.SIGKILL)
    assert tick_until(sched, lambda: sched.store.get(job.id).status.is_terminal, timeout=120) < 30
    job = sched.store.get(job.id)
    assert job.status is S.FAILED, job.reason
    reason = job.reason or ""
    assert "the trainer exited with code 1" in reason and "no state was saved" in reason
    assert reason.endswith(
        f"launcher: training failed: training process 1 of 2 (pid {pids[1]}) was killed by SIGKILL"
    )
    _nothing_left(job.pgid or 0, pids, port)


def test_accelerate_launch_trains_as_kohya_users_start_it(tmp_path: Path, demo_config: str) -> None:
    """`accelerate launch --num_processes 2 -m kohya_backend train --config X` (on a machine without GPUs,
    accelerate needs --multi_gpu to start several CPU processes): the trainer reads its place from RANK/WORLD_SIZE."""
    (tmp_path / "config.toml").write_text(
        _config(demo_config, output_dir=(tmp_path / "out").as_posix(), max_train_steps=2)
    )
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    done = _cli(["train", "--config", "config.toml"], tmp_path, launcher=accelerate)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-parallel training in 2 processes (gloo)" in done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo-sd_1_5.safetensors"]
    _, metadata = load_lora(tmp_path / "out" / "demo-sd_1_5.safetensors")
    assert (metadata["ss_total_batch_size"], metadata["ss_steps"]) == ("4", "2")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_a_two_gpu_job_trains_with_nccl_and_fp16(
    tmp_path: Path, demo_config: str, make_scheduler: Callable[..., Scheduler]
) -> None:
    """What tools/gpu_check.sh runs on a machine with 2 or more GPUs: a job given 2 GPUs by the scheduler (its
    CUDA_VISIBLE_DEVICES), NCCL, fp16 with the loss scaler; it prints the figures."""
    from kohya_backend.jobs.devices import default_slots, detect_gpus

    sched = make_scheduler(tmp_path / "home", devices=default_slots(detect_gpus(), mps=False))
    config = config_without_name(demo_config, max_train_steps=60, mixed_precision="fp16", save_state=True)
    started = time.monotonic()
    job = _submit(sched, "two-gpus", config, gpus=2)
    tick_until(sched, lambda: sched.store.get(job.id).status.is_terminal, timeout=600)
    job = sched.store.get(job.id)
    assert job.status is S.COMPLETED, job.reason
    log = (job.folder / "train.log").read_text(encoding="utf-8")
    assert "data-parallel training in 2 processes (nccl)" in log
    state = sorted((job.folder / "output" / "two-gpus-state").glob("state-*"))[-1]
    assert (state / "grad_scaler.pt").is_file()  # fp16's loss scale is saved with the state
    lora, metadata = load_lora(job.folder / "output" / "two-gpus.safetensors")
    assert all(torch.isfinite(t).all() for t in lora.values()) and metadata["ss_total_batch_size"] == "4"
    done = next(e for e in read_events(job.folder / "events.jsonl") if e["kind"] == "done")
    figures = {
        "devices": json.loads((job.folder / "run.json").read_text(encoding="utf-8"))["device"],
        "steps": job.progress.get("step"),
        "it_per_s": job.progress.get("it_per_s"),
        "peak_cuda_gb_rank0": done.get("peak_cuda_gb"),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(f"\n2-GPU job figures: {json.dumps(figures)}")
