"""The scheduler with the local runner and the real trainer: states, progress, delivery, devices, commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import tomlkit
from jobs_support import config_without_name, statuses
from safetensors.numpy import save_file

import kohya_backend
from kohya_backend.errors import ConfigError, TrainManagementError
from kohya_backend.jobs.progress import EventTail, log_tail, summarize
from kohya_backend.jobs.runner import RUN_NAME, LocalRunner, RunStatus, trainer_env
from kohya_backend.jobs.scheduler import (
    Scheduler,
    SchedulerBusy,
    check_output_name,
    describe_exit,
    outcome_of,
)
from kohya_backend.jobs.states import InvalidTransition, JobStatus
from kohya_backend.jobs.store import Job, JobStore

S = JobStatus


def _submit(sched: Scheduler, name: str, config: str, **params: object) -> Job:
    return sched.submit(
        fm_type="sd_1_5",
        model="demo-sd_1_5.safetensors",
        dataset="demo",
        instance_type="local",
        output_name=name,
        config_toml=config,
        params=dict(params),
    )


def _until(sched: Scheduler, done: Callable[[], bool], *, timeout: float = 90, tick: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            jobs, _ = sched.store.list(limit=1000)
            state = "\n".join(f"{j.id} {j.status} {j.reason}\n{log_tail(j.folder)}" for j in jobs[:5])
            raise AssertionError(f"timed out; jobs:\n{state}")
        if tick:
            sched.tick()
        time.sleep(0.1)


# -- with the real trainer ----------------------------------------------------------------------------------


def test_job_trains_in_the_background_and_is_delivered(
    tmp_path: Path, demo_config: str, make_scheduler: Callable[..., Scheduler]
) -> None:
    home = Path(tomlkit.parse(demo_config)["train_data_dir"]).parent.parent
    config = config_without_name(
        demo_config,
        max_train_steps=6,
        save_every_n_steps=3,
        sample_prompts=str(home / "prompts.txt"),
        sample_every_n_steps=6,
    )
    delivered: list[tuple[str, list[Path]]] = []
    lora_dir = tmp_path / "Lora"
    sched = make_scheduler(
        tmp_path / "home",
        lora_dir=lora_dir,
        keep_epochs=True,
        on_delivered=lambda j, p: delivered.append((j.id, p)),
    )
    job = _submit(sched, "dog", config)
    assert 'output_name = "dog"' in job.config_toml  # the job's name is written into its config
    sched.start()
    try:
        _until(sched, lambda: sched.store.get(job.id).status.is_terminal, tick=False)
    finally:
        sched.stop()
    job = sched.store.get(job.id)
    assert job.status is S.COMPLETED, job.reason
    assert statuses(sched.store, job.id) == [S.QUEUED, S.PREPARING, S.TRAINING, S.SAVING, S.COMPLETED]

    progress = job.progress
    assert progress["step"] == progress["total_steps"] == 6
    assert progress["epoch"] == 1 and progress["phase"] == "completed"
    assert isinstance(progress["loss"], float) and isinstance(progress["avg_loss"], float)
    assert sorted(progress["lrs"]) == pytest.approx([1e-4, 1e-3]) and progress["lr"] == progress["lrs"][0]
    assert progress["it_per_s"] > 0 and progress["eta_s"] == pytest.approx(0.0, abs=1e-6)
    assert job.heartbeat_at is not None and job.heartbeat_at >= job.created_at
    lines = (job.folder / "events.jsonl").read_bytes().count(b"\n")
    assert sched.store.event_offset(job.id) == lines

    final = job.folder / "output" / "dog.safetensors"
    assert (lora_dir / "dog.safetensors").read_bytes() == final.read_bytes()
    side = json.loads((lora_dir / "dog.json").read_text(encoding="utf-8"))
    assert side["sd version"] == "SD1" and side["activation text"].startswith("demo")
    assert (lora_dir / "dog.preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (lora_dir / "dog-epochs" / "dog-step00000003.safetensors").is_file()
    assert str(lora_dir / "dog.safetensors") in job.outputs and str(final) in job.outputs
    assert any(p.endswith(".png") and "/sample/" in p for p in job.outputs)
    assert job.reason == f"LoRA written to {lora_dir / 'dog.safetensors'}"
    assert [job_id for job_id, _ in delivered] == [job.id]
    assert delivered[0][1][:3] == [
        lora_dir / "dog.safetensors",
        lora_dir / "dog.json",
        lora_dir / "dog.preview.png",
    ]

    run = json.loads((job.folder / RUN_NAME).read_text(encoding="utf-8"))
    assert (run["pid"], run["pgid"]) == (job.pid, job.pgid) and run["device"] == "cpu"
    assert "--job" in run["command"] and str(job.folder) in run["command"]
    log = (job.folder / "train.log").read_text(encoding="utf-8")
    assert "=== " in log and "LoRA written" in log


def test_user_errors_fail_with_the_trainers_message_and_devices_limit_concurrency(
    tmp_path: Path, demo_config: str, make_scheduler: Callable[..., Scheduler]
) -> None:
    bad = config_without_name(demo_config, not_a_kohya_key=1)
    sched = make_scheduler(tmp_path / "home", devices={"cpu": 1, "cuda:0": 1})
    first = _submit(sched, "a", bad, device="cpu")
    second = _submit(sched, "b", bad, device="cpu")
    third = _submit(sched, "c", bad)

    sched.tick()
    get = sched.store.get
    # FIFO, but a job pinned to a busy device lets a later one take the free device
    assert (get(first.id).status, get(second.id).status, get(third.id).status) == (
        S.PREPARING,
        S.QUEUED,
        S.PREPARING,
    )
    assert {j: h.device for j, h in sched.running().items()} == {first.id: "cpu", third.id: "cuda:0"}

    _until(sched, lambda: get(first.id).status.is_terminal and get(third.id).status.is_terminal)
    for job_id in (first.id, third.id):
        job = get(job_id)
        assert job.status is S.FAILED
        assert "not_a_kohya_key" in (job.reason or ""), job.reason
        assert job.progress["error"]["message"]
    # the first job's slot is free now: the pinned second job starts there
    _until(sched, lambda: get(second.id).status is not S.QUEUED)
    assert get(second.id).status is S.PREPARING and sched.running()[second.id].device == "cpu"
    sched.cancel(second.id)
    _until(sched, lambda: get(second.id).status.is_terminal)
    assert get(second.id).status is S.CANCELLED


# -- commands -----------------------------------------------------------------------------------------------


def test_submit_refuses_duplicates_and_bad_input(
    tmp_path: Path, make_scheduler: Callable[..., Scheduler]
) -> None:
    sched = make_scheduler(tmp_path / "home")
    job = _submit(sched, "dog", "network_dim = 8\n")
    assert tomlkit.parse(job.config_toml)["output_name"] == "dog"
    sched.cancel(job.id)
    with pytest.raises(TrainManagementError, match="already used"):
        _submit(sched, "dog", "network_dim = 8\n")
    with pytest.raises(ConfigError, match="output name is 'cat'"):
        _submit(sched, "cat", 'output_name = "dog2"\n')
    with pytest.raises(ConfigError, match="line 1"):
        _submit(sched, "cat", "network_dim = = 8\n")
    with pytest.raises(TrainManagementError, match="device 'cuda:3' is not available"):
        _submit(sched, "cat", "", device="cuda:3")
    with pytest.raises(TrainManagementError, match="instance type 'aws' is not available"):
        sched.submit(
            fm_type="sd_1_5", model="m", dataset="d", instance_type="aws", output_name="x", config_toml=""
        )
    with pytest.raises(TrainManagementError, match="unknown FM type"):
        sched.submit(
            fm_type="sd_2", model="m", dataset="d", instance_type="local", output_name="x", config_toml=""
        )
    for name in ["", "../up", "a/b", "a\\b", ".hidden", "x:y", " pad", "n" * 151]:
        with pytest.raises(ConfigError, match="output_name"):
            check_output_name(name)
    assert check_output_name("犬 v2.1_final-x") == "犬 v2.1_final-x"
    assert sched.store.list()[1] == 1


def test_cancel_and_resume_follow_the_state_machine(
    tmp_path: Path, make_scheduler: Callable[..., Scheduler]
) -> None:
    sched = make_scheduler(tmp_path / "home")
    job = _submit(sched, "dog", "")
    cancelled = sched.cancel(job.id)
    assert cancelled.status is S.CANCELLED and cancelled.pid is None
    assert cancelled.reason == "cancelled before it started"
    with pytest.raises(InvalidTransition, match="'cancelled'"):
        sched.cancel(job.id)
    resumed = sched.resume(job.id)
    assert resumed.status is S.QUEUED and resumed.progress["resume"] is True
    with pytest.raises(InvalidTransition):
        sched.resume(job.id)
    assert statuses(sched.store, job.id) == [S.QUEUED, S.CANCELLED, S.QUEUED]


def test_one_scheduler_per_home(tmp_path: Path, make_scheduler: Callable[..., Scheduler]) -> None:
    first = make_scheduler(tmp_path / "home")
    first.tick()
    second = make_scheduler(tmp_path / "home")
    with pytest.raises(SchedulerBusy, match=f"process {os.getpid()}"):
        second.tick()
    job = _submit(second, "dog", "")  # commands still work: they only touch the store
    assert second.cancel(job.id).status is S.CANCELLED
    first.stop()
    second.tick()  # the home is free again
    with pytest.raises(SchedulerBusy):
        first.tick()
    second.stop()


def _lora(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"ss_tag_frequency": json.dumps({"3_cat": {"cat": 3}}), "ss_steps": "4"}
    save_file({"x.alpha": np.array(4.0, dtype=np.float32)}, str(path), metadata=metadata)


def _dead_process_run(job: Job, store: JobStore) -> None:
    """Record a run whose process is gone, as a host that crashed during training leaves behind."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    create_time = psutil.Process(proc.pid).create_time()
    proc.wait()
    info = {"runner": "local", "pid": proc.pid, "pgid": proc.pid, "create_time": create_time, "device": "cpu"}
    (job.folder / RUN_NAME).write_text(json.dumps(info), encoding="utf-8")
    store.transition(job.id, S.PREPARING, "test: started")
    store.transition(job.id, S.TRAINING, "test: training")
    store.set_process(job.id, proc.pid, proc.pid)


def test_recovery_settles_jobs_whose_trainer_is_gone(
    tmp_path: Path, make_scheduler: Callable[..., Scheduler]
) -> None:
    store = JobStore(tmp_path / "home")
    sched = make_scheduler(tmp_path / "home", lora_dir=tmp_path / "Lora")
    never_started = _submit(sched, "a", "")
    store.transition(never_started.id, S.PREPARING, "test: claimed")
    vanished = _submit(sched, "b", "")
    _dead_process_run(vanished, store)
    finished = _submit(sched, "c", "")
    _dead_process_run(finished, store)
    _lora(finished.folder / "output" / "c.safetensors")
    (finished.folder / "result.json").write_text(
        json.dumps({"status": "completed", "step": 4}), encoding="utf-8"
    )
    (vanished.folder / "train.log").write_text("loading model\nstep 3/10\n", encoding="utf-8")

    restarted = make_scheduler(tmp_path / "home", lora_dir=tmp_path / "Lora")
    restarted.tick()

    assert store.get(never_started.id).status is S.INTERRUPTED
    assert "stopped before the trainer started" in (store.get(never_started.id).reason or "")
    gone = store.get(vanished.id)
    assert gone.status is S.INTERRUPTED
    assert "vanished" in (gone.reason or "") and "step 3/10" in (gone.reason or "")
    done = store.get(finished.id)
    assert done.status is S.COMPLETED, done.reason  # it finished while the host was down: delivered now
    assert (tmp_path / "Lora" / "c.safetensors").is_file()
    assert restarted.running() == {}


def test_a_failed_start_fails_the_job_and_leaves_no_trainer(
    tmp_path: Path, make_scheduler: Callable[..., Scheduler]
) -> None:
    sched = make_scheduler(tmp_path / "home")
    job = _submit(sched, "dog", "")
    (job.folder / RUN_NAME).mkdir()  # run.json cannot be written: the start fails after the spawn
    sched.tick()
    job = sched.store.get(job.id)
    assert job.status is S.FAILED and "could not start the trainer" in (job.reason or "")
    assert sched.running() == {}
    folder = str(job.folder.resolve())
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if folder in (p.info["cmdline"] or [])]
    assert [p for p in leftovers if p.status() != psutil.STATUS_ZOMBIE] == []


def test_attach_never_adopts_another_process(
    tmp_path: Path, make_scheduler: Callable[..., Scheduler]
) -> None:
    sched = make_scheduler(tmp_path / "home")
    job = _submit(sched, "dog", "")
    runner = LocalRunner()
    assert runner.attach(job) is None  # no run.json
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        create_time = psutil.Process(other.pid).create_time()
        info = {"runner": "local", "pid": other.pid, "pgid": other.pid, "create_time": create_time}
        (job.folder / RUN_NAME).write_text(json.dumps(info), encoding="utf-8")
        assert runner.attach(job) is None  # alive, right start time, but not this job's trainer
        info["create_time"] = create_time - 100  # a recycled pid: same number, another process
        (job.folder / RUN_NAME).write_text(json.dumps(info), encoding="utf-8")
        assert runner.attach(job) is None
        (job.folder / RUN_NAME).write_text("{broken", encoding="utf-8")
        assert runner.attach(job) is None
    finally:
        other.kill()
        other.wait()


def test_trainer_env_is_offline_and_pins_the_device() -> None:
    env = trainer_env("cuda:1", base={"PYTHONPATH": "/somewhere", "HF_HUB_OFFLINE": "0"})
    root = str(Path(kohya_backend.__file__).resolve().parent.parent)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/somewhere"]
    assert (
        env["CUDA_VISIBLE_DEVICES"] == "1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    )  # nvidia-smi's numbering
    assert trainer_env("cpu", base={})["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(TrainManagementError, match="unknown device"):
        trainer_env("tpu:0", base={})


# -- pure pieces --------------------------------------------------------------------------------------------


def test_event_tail_reads_only_complete_new_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"kind": "start"}\n{"kind": "plan", "total_steps": 4}\n{"kind": "st')
    tail = EventTail()
    events, done = tail.read("j", path, 0)
    assert [e["kind"] for e in events] == ["start", "plan"] and done == 2
    with open(path, "ab") as handle:
        handle.write(b'ep", "step": 1}\nnot json\n')
    events, done = tail.read("j", path, done)
    assert events == [{"kind": "step", "step": 1}, {"kind": "unreadable", "text": "not json"}] and done == 4
    assert tail.read("j", path, done) == ([], 4)
    # a restarted scheduler knows only the line count from the store
    events, done = EventTail().read("j", path, 3)
    assert [e["kind"] for e in events] == ["unreadable"] and done == 4
    assert EventTail().read("j", tmp_path / "missing.jsonl", 0) == ([], 0)


def test_summarize_turns_events_into_progress() -> None:
    events = [
        {"kind": "start", "device": "cpu"},
        {"kind": "plan", "total_steps": 10, "steps_per_epoch": 5, "epochs": 2},
        {"kind": "step", "step": 3, "epoch": 1, "loss": 0.5, "avg_loss": 0.4, "lrs": [1e-4, 1e-3], "it_s": 2.5,
         "eta_s": 2.8, "total_steps": 10},
        {"kind": "sample", "path": "/j/output/sample/a.png"},
        {"kind": "weights", "choice": "kept", "message": "kept 2 GB", "fp32_gb": 4.0},
        {"kind": "warning", "message": "w2"},
        {"kind": "saved", "path": "/j/output/x.safetensors", "final": True},
        {"kind": "error", "message": "boom", "hint": "fix"},
    ]  # fmt: skip
    summary = summarize(events, ["w1"])
    p = summary.progress
    assert (p["step"], p["total_steps"], p["total_epochs"], p["steps_per_epoch"]) == (3, 10, 2, 5)
    assert (p["lr"], p["it_per_s"], p["eta_s"], p["loss"], p["avg_loss"]) == (1e-4, 2.5, 2.8, 0.5, 0.4)
    assert p["warnings"] == ["w1", "w2"] and p["error"] == {"message": "boom", "hint": "fix"}
    assert p["phase"] == "saving" and p["last_sample"] == "/j/output/sample/a.png"
    assert p["frozen_weights"] == {"choice": "kept", "message": "kept 2 GB"}
    assert summary.outputs == ["/j/output/sample/a.png", "/j/output/x.safetensors"]
    assert summary.stepped and summary.final_saved
    assert (
        summarize([{"kind": "warning", "message": str(i)} for i in range(30)], []).progress["warnings"][0]
        == "10"
    )


def test_outcome_from_exit_code_and_result() -> None:
    done = {"status": "completed"}
    assert outcome_of(0, done) == "completed"
    assert outcome_of(0, None) == "crashed"  # exit 0 without a result is not a finished job
    assert outcome_of(3, {"status": "stopped"}) == "stopped"
    assert outcome_of(2, {"status": "failed"}) == outcome_of(2, None) == "failed"
    assert outcome_of(-9, None) == outcome_of(1, None) == "crashed"
    assert outcome_of(None, done) == "completed" and outcome_of(None, None) == "crashed"
    assert describe_exit(-9) == "was killed by SIGKILL (exit code -9)"
    assert describe_exit(1) == "exited with code 1"
    assert "unknown" in describe_exit(None)
    assert RunStatus(False, None).exit_code is None
