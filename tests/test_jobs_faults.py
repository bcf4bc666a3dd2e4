"""Jobs that survive anything: killed trainers, a restarted host, cancels at every stage, a long queue.

Every test runs the real trainer (`python -m kohya_backend train --job DIR`) on the tiny demo model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tomlkit
from jobs_support import config_without_name, statuses, tick_until

import kohya_backend
from kohya_backend.jobs.progress import log_tail
from kohya_backend.jobs.runner import LocalRunner
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job, JobStore

S = JobStatus


def _submit(sched: Scheduler, name: str, config: str) -> Job:
    return sched.submit(
        fm_type="sd_1_5",
        model="demo-sd_1_5.safetensors",
        dataset="demo",
        instance_type="local",
        output_name=name,
        config_toml=config,
    )


def _step_events(job: Job) -> list[dict]:
    lines = (job.folder / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == "step"]


def test_kill_9_mid_run_fails_within_seconds_with_the_log_tail(
    tmp_path: Path, demo_config: str, make_scheduler: Callable[..., Scheduler]
) -> None:
    sched = make_scheduler(tmp_path / "home")
    job = _submit(sched, "killed", config_without_name(demo_config, max_train_steps=500))
    tick_until(sched, lambda: sched.store.get(job.id).status is S.TRAINING)
    job = sched.store.get(job.id)
    assert job.pgid is not None
    os.killpg(job.pgid, signal.SIGKILL)

    assert tick_until(sched, lambda: sched.store.get(job.id).status.is_terminal) < 5
    job = sched.store.get(job.id)
    assert job.status is S.FAILED
    reason = job.reason or ""
    assert "was killed by SIGKILL (exit code -9)" in reason and "no state was saved" in reason
    last_line = (job.folder / "train.log").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert "Last lines of train.log" in reason and reason.endswith(last_line)
    assert not (job.folder / "result.json").exists()


def test_kill_9_after_a_saved_state_is_interrupted_and_resume_finishes(
    tmp_path: Path, demo_config: str, make_scheduler: Callable[..., Scheduler]
) -> None:
    lora_dir = tmp_path / "Lora"
    sched = make_scheduler(tmp_path / "home", lora_dir=lora_dir)
    config = config_without_name(demo_config, max_train_steps=12, save_state=True, save_every_n_steps=2)
    job = _submit(sched, "resumed", config)
    tick_until(sched, lambda: bool(sched.store.get(job.id).progress.get("state")))
    os.killpg(sched.store.get(job.id).pgid or 0, signal.SIGKILL)
    tick_until(sched, lambda: sched.store.get(job.id).status is not S.TRAINING)
    job = sched.store.get(job.id)
    assert job.status is S.INTERRUPTED, job.reason
    assert "SIGKILL" in (job.reason or "") and "resume continues from the saved state" in (job.reason or "")
    killed_at = job.progress["step"]
    assert killed_at < 12

    sched.resume(job.id)
    tick_until(sched, lambda: sched.store.get(job.id).status.is_terminal)
    job = sched.store.get(job.id)
    assert job.status is S.COMPLETED, job.reason
    result = json.loads((job.folder / "result.json").read_text(encoding="utf-8"))
    assert result["status"] == "completed" and result["step"] == 12 and job.progress["step"] == 12
    steps = [e["step"] for e in _step_events(job)]
    resumed_from = steps.index(killed_at) + 1
    # the second run continued from the saved state (an even step <= the kill), not from step 1
    assert 2 < steps[resumed_from] <= killed_at + 1 and steps[-1] == 12
    assert steps[resumed_from:] == list(range(steps[resumed_from], 13))
    assert (lora_dir / "resumed.safetensors").is_file()
    assert statuses(sched.store, job.id) == [
        S.QUEUED, S.PREPARING, S.TRAINING, S.INTERRUPTED, S.QUEUED, S.PREPARING, S.TRAINING, S.SAVING, S.COMPLETED,
    ]  # fmt: skip


_HOST = """
import os, sys, time
from pathlib import Path
from kohya_backend.jobs.runner import LocalRunner
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.store import JobStore

sched = Scheduler(JobStore(Path(sys.argv[1])), [LocalRunner()], devices={"cpu": 1})
deadline = time.monotonic() + 120
while sched.store.get(sys.argv[2]).status.value != "training" and time.monotonic() < deadline:
    sched.tick()
    time.sleep(0.05)
os._exit(0)  # the WebUI dies here: no cleanup, the trainer is left running
"""


def test_restarted_host_reattaches_to_the_running_trainer(
    tmp_path: Path, demo_config: str, make_scheduler: Callable[..., Scheduler]
) -> None:
    home = tmp_path / "home"
    store = JobStore(home)
    job = _submit(make_scheduler(home), "survivor", config_without_name(demo_config, max_train_steps=14))
    env = {**os.environ, "PYTHONPATH": str(Path(kohya_backend.__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, "-c", _HOST, str(home), job.id], env=env, check=True, timeout=150)
    job = store.get(job.id)
    assert job.status is S.TRAINING and job.pid is not None
    offset = store.event_offset(job.id)
    assert offset > 0

    lora_dir = tmp_path / "Lora"
    sched = make_scheduler(home, lora_dir=lora_dir)
    sched.tick()
    assert sched.running()[job.id].pid == job.pid  # re-attached, not restarted
    tick_until(sched, lambda: store.get(job.id).status.is_terminal)
    job = store.get(job.id)
    assert job.status is S.COMPLETED, job.reason
    assert statuses(store, job.id) == [S.QUEUED, S.PREPARING, S.TRAINING, S.SAVING, S.COMPLETED]
    assert job.progress["step"] == 14 and store.event_offset(job.id) > offset
    assert [e["step"] for e in _step_events(job)] == list(range(1, 15))  # one run, never restarted
    assert (lora_dir / "survivor.safetensors").is_file()


def test_cancel_during_loading_during_training_and_after_the_grace_period(
    tmp_path: Path, demo_config: str, make_scheduler: Callable[..., Scheduler]
) -> None:
    sched = make_scheduler(tmp_path / "home", devices={"cpu": 2})
    config = config_without_name(demo_config, max_train_steps=500)
    loading = _submit(sched, "loading", config)
    training = _submit(sched, "training", config)
    # A third trainer, driven by the runner alone, that ignores SIGTERM long enough to need SIGKILL.
    other = JobStore(tmp_path / "other").create(
        fm_type="sd_1_5", model="m", dataset="d", instance_type="local", output_name="forced",
        config_toml=tomlkit.dumps({**tomlkit.parse(config), "output_name": "forced"}), params={},
    )  # fmt: skip
    runner = LocalRunner()
    forced = runner.start(other, resume=False, device="cpu")
    get = sched.store.get

    def started(job: Job) -> bool:
        """Past start-up (its stop handler is installed) but not yet training."""
        now = get(job.id)
        return now.status is S.PREPARING and now.progress.get("phase") in ("loading", "caching")

    cancelled: set[str] = set()

    def step() -> bool:
        if started(loading) and loading.id not in cancelled:
            assert sched.cancel(loading.id).status is S.CANCELLING
            cancelled.add(loading.id)
        if get(training.id).status is S.TRAINING and training.id not in cancelled:
            assert sched.cancel(training.id).status is S.CANCELLING
            cancelled.add(training.id)
        events = other.folder / "events.jsonl"
        if "forced" not in cancelled and events.exists() and b'"start"' in events.read_bytes():
            # its stop handler is installed, and loading takes seconds: only SIGKILL ends it this soon
            runner.cancel(forced, grace_s=0.3)
            cancelled.add("forced")
        return get(loading.id).status.is_terminal and get(training.id).status.is_terminal

    tick_until(sched, step, timeout=120)
    for job, last in ((loading, S.PREPARING), (training, S.TRAINING)):
        done = get(job.id)
        assert done.status is S.CANCELLED, done.reason
        trained = [S.TRAINING] if last is S.TRAINING else []
        assert statuses(sched.store, job.id) == [S.QUEUED, S.PREPARING, *trained, S.CANCELLING, S.CANCELLED]
        result = json.loads((done.folder / "result.json").read_text(encoding="utf-8"))
        assert result["status"] == "stopped"  # a clean stop (exit 3), not a kill
        assert done.reason and done.reason.startswith(f"cancelled at step {result['step']}")
    assert json.loads((get(loading.id).folder / "result.json").read_text())["step"] == 0

    deadline = time.monotonic() + 60
    while (status := runner.poll(forced)).alive:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "forced" in cancelled
    assert status.exit_code == -signal.SIGKILL
    assert not (other.folder / "result.json").exists()


def test_200_queued_jobs_start_in_fifo_order_one_at_a_time(
    tmp_path: Path, make_scheduler: Callable[..., Scheduler]
) -> None:
    sched = make_scheduler(tmp_path / "home", cancel_grace_s=5)
    ids = [_submit(sched, f"job{i:03d}", "").id for i in range(200)]
    started: list[str] = []
    deadline = time.monotonic() + 100
    while sched.store.list(status=[S.QUEUED, *S.active()], limit=1)[1]:
        assert time.monotonic() < deadline, f"{len(started)} of 200 started"
        sched.tick()
        running = sched.running()
        assert len(running) <= 1
        for job_id in running:
            if job_id not in started:
                started.append(job_id)
                sched.cancel(job_id)  # SIGTERM during start-up: the trainer ends at once
    assert started == ids
    jobs, total = sched.store.list(status=[S.CANCELLED], limit=1000)
    assert total == 200
    assert all(
        statuses(sched.store, j.id) == [S.QUEUED, S.PREPARING, S.CANCELLING, S.CANCELLED] for j in jobs
    )
    preparing_at = [sched.store.transitions(i)[1].at for i in ids]
    assert preparing_at == sorted(preparing_at)


def _freeze_when_final_lora_is_written(job: Job, timeout: float = 90) -> int:
    """SIGSTOP the trainer's process group as soon as its events say the final LoRA is written; returns the pgid.

    The trainer then still has its final state to save, so stopping it here holds it inside the saving phase.
    """
    events = job.folder / "events.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if events.exists() and b'"final": true' in events.read_bytes():
            pgid = json.loads((job.folder / "run.json").read_text(encoding="utf-8"))["pgid"]
            os.killpg(pgid, signal.SIGSTOP)
            return int(pgid)
        time.sleep(0.002)
    raise AssertionError(f"the trainer never wrote its final LoRA:\n{log_tail(job.folder)}")


@pytest.mark.parametrize("trainer_answers", [True, False], ids=["finishes", "killed_after_grace"])
def test_cancel_during_saving(
    tmp_path: Path, demo_config: str, trainer_answers: bool, make_scheduler: Callable[..., Scheduler]
) -> None:
    lora_dir = tmp_path / "Lora"
    sched = make_scheduler(
        tmp_path / "home", lora_dir=lora_dir, cancel_grace_s=60 if trainer_answers else 0.5
    )
    job = _submit(sched, "saving", config_without_name(demo_config, max_train_steps=4, save_state=True))
    tick_until(sched, lambda: (sched.store.get(job.id).folder / "run.json").exists())
    pgid = _freeze_when_final_lora_is_written(job)
    try:
        tick_until(sched, lambda: sched.store.get(job.id).status is S.SAVING)
        assert sched.cancel(job.id).status is S.CANCELLING
        sched.tick()  # the scheduler sends SIGTERM; it waits, pending, in the frozen trainer
        if trainer_answers:
            os.killpg(pgid, signal.SIGCONT)  # it resumes, finishes its state and exits cleanly
        else:
            time.sleep(0.8)  # past the grace period: SIGKILL ends the frozen trainer
        tick_until(sched, lambda: sched.store.get(job.id).status.is_terminal)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGCONT)
    job = sched.store.get(job.id)
    steps = statuses(sched.store, job.id)
    assert steps[-3:-1] == [S.SAVING, S.CANCELLING]
    written = job.folder / "output" / "saving.safetensors"
    assert written.is_file()  # written atomically before the cancel: complete either way
    if trainer_answers:
        # The LoRA was finished when the stop arrived: the job is completed and delivered, not called cancelled.
        assert job.status is S.COMPLETED, job.reason
        assert (lora_dir / "saving.safetensors").read_bytes() == written.read_bytes()
    else:
        assert job.status is S.CANCELLED, job.reason
        assert "SIGKILL" in (job.reason or "")
        assert not lora_dir.exists() or not any(lora_dir.iterdir())  # nothing partial, nothing delivered
        sched.resume(job.id)
        tick_until(sched, lambda: sched.store.get(job.id).status.is_terminal)
        assert sched.store.get(job.id).status is S.COMPLETED
        assert (lora_dir / "saving.safetensors").is_file()
