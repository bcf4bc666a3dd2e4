"""A trainer that stops making progress: the real trainer on the tiny demo model, frozen with SIGSTOP.

Frozen after its first step it is shown as stalled (with its log's last lines) once it has reported nothing for
the configured time, a cancel stops it at once instead of after the grace period, and a trainer that reports
again is no longer stalled. Frozen while loading, before its first step, it is never called stalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from jobs_support import config_without_name

from kohya_backend.jobs.progress import log_tail
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job
from kohya_backend.service.training import job_summary

S = JobStatus
STALL_S = 1.5


def _until(sched: Scheduler, done: Callable[[], bool], *, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            jobs, _ = sched.store.list(limit=5)
            raise AssertionError(
                "timed out: " + "\n".join(f"{j.id} {j.status} {j.reason} {j.progress}" for j in jobs)
            )
        sched.tick()
        time.sleep(0.05)


def _events(job: Job) -> list[dict[str, object]]:
    path = job.folder / "events.jsonl"
    return (
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    )


@contextlib.contextmanager
def _frozen_when(job: Job, kind: str, timeout: float = 90) -> Iterator[int]:
    """SIGSTOP the trainer's process group once its events hold an event of `kind`; SIGCONT it at the end."""
    deadline = time.monotonic() + timeout
    while not any(e["kind"] == kind for e in _events(job)):
        assert time.monotonic() < deadline, f"no {kind!r} event:\n{log_tail(job.folder)}"
        time.sleep(0.002)
    pgid = int(json.loads((job.folder / "run.json").read_text(encoding="utf-8"))["pgid"])
    os.killpg(pgid, signal.SIGSTOP)
    try:
        yield pgid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGCONT)


def _submit(sched: Scheduler, demo: str, name: str) -> Job:
    config = config_without_name(demo, max_train_steps=400, sample_every_n_steps=0)
    return sched.submit(
        fm_type="sd_1_5", model="demo-sd_1_5.safetensors", dataset="demo", instance_type="local",
        output_name=name, config_toml=config,
    )  # fmt: skip


def test_a_frozen_training_is_shown_stalled_until_it_reports_and_a_cancel_stops_it_at_once(
    tmp_path: Path, demo_config: str, make_scheduler: Callable[..., Scheduler]
) -> None:
    """One trainer through every case (a trainer run is the expensive part): frozen while loading, frozen after a
    step and thawed, frozen across a restart of its host and thawed, frozen again and cancelled."""
    # A grace period far longer than any wait below: a cancel that used it would time out.
    settings = {"stall_after_s": STALL_S, "cancel_grace_s": 600, "poll_interval_s": 1.0}
    sched = make_scheduler(tmp_path / "home", **settings)
    job = _submit(sched, demo_config, "frozen")
    _until(sched, lambda: (job.folder / "run.json").exists())
    with _frozen_when(job, "start"):  # the trainer's first event: it is loading the model
        began = time.monotonic()
        _until(sched, lambda: time.monotonic() - began > 3 * STALL_S)
        loading = sched.store.get(job.id)
        assert loading.status is S.PREPARING and job_summary(loading)["stalled"] is None

    with _frozen_when(job, "step") as pgid:
        _until(sched, lambda: sched.store.get(job.id).status is S.TRAINING)
        _until(sched, lambda: bool(job_summary(sched.store.get(job.id))["stalled"]))
        shown = job_summary(sched.store.get(job.id))
        assert shown["status"] == "training" and shown["stalled"]["silent_s"] >= STALL_S - 0.5
        assert shown["stalled"]["log_tail"] and shown["stalled"]["log_tail"] in log_tail(job.folder)
        os.killpg(pgid, signal.SIGCONT)  # it goes on: the next step clears the mark
        _until(sched, lambda: job_summary(sched.store.get(job.id))["stalled"] is None)
        assert sched.store.get(job.id).status is S.TRAINING

        # Stalled when the host restarts: the mark is stored, the new scheduler re-attaches, and the trainer's
        # next report clears the stored mark too (else Cancel would kill the healthy trainer at once).
        os.killpg(pgid, signal.SIGSTOP)
        _until(sched, lambda: bool(job_summary(sched.store.get(job.id))["stalled"]))
        sched.stop()
        sched = make_scheduler(tmp_path / "home", **settings)
        sched.tick()  # re-attached to the frozen trainer, the stored mark kept
        assert job_summary(sched.store.get(job.id))["stalled"]
        os.killpg(pgid, signal.SIGCONT)
        _until(sched, lambda: job_summary(sched.store.get(job.id))["stalled"] is None)
        thawed = sched.store.get(job.id)  # cleared by its next report, not by its end
        assert thawed.status is S.TRAINING and not thawed.progress.get("stalled")

        os.killpg(pgid, signal.SIGSTOP)
        _until(sched, lambda: bool(job_summary(sched.store.get(job.id))["stalled"]))
        sched.cancel(job.id)  # without the 600 s grace period: the wait below would time out
        _until(sched, lambda: sched.store.get(job.id).status is S.CANCELLED, timeout=60)
    job = sched.store.get(job.id)
    assert "SIGKILL" in (job.reason or "") and job_summary(job)["stalled"] is None
