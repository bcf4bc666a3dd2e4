"""Helpers shared by the job tests (scheduler and fault tests)."""

from __future__ import annotations

import time
from collections.abc import Callable

import tomlkit

from kohya_backend.jobs.progress import log_tail
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import JobStore

# A config that trains the tiny demo model (prepare_demo) in seconds on a CPU; format with steps= and name=.
FAST_CONFIG = """\
tokenizer_cache_dir = "tokenizer"
caption_extension = ".txt"
resolution = "64,64"
enable_bucket = false
train_batch_size = 2
max_train_steps = {steps}
network_dim = 4
network_alpha = 4
optimizer_type = "AdamW"
learning_rate = 1e-3
lr_scheduler = "constant"
mixed_precision = "no"
save_precision = "fp16"
seed = 1
output_name = "{name}"
"""


def config_without_name(base: str, **changes: object) -> str:
    """The demo config with output_name removed (the scheduler writes it) and `changes` applied."""
    doc = tomlkit.parse(base)
    del doc["output_name"]
    for key, value in changes.items():
        doc[key] = value
    return tomlkit.dumps(doc)


def statuses(store: JobStore, job_id: str) -> list[JobStatus]:
    """Every status a job went through, in order."""
    return [t.to_status for t in store.transitions(job_id)]


def tick_until(sched: Scheduler, done: Callable[[], bool], *, timeout: float = 90) -> float:
    """Tick the scheduler until `done()`; the seconds it took. On timeout, fails with the newest jobs' log tails."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            jobs, _ = sched.store.list(limit=10)
            state = "\n".join(f"{j.id} {j.status} {j.reason}\n{log_tail(j.folder, 40)}" for j in jobs)
            raise AssertionError(f"timed out; jobs:\n{state}")
        sched.tick()
        time.sleep(0.05)
    return time.monotonic() - start
