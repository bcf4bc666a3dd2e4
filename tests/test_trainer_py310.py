"""The WebUI's own Python 3.10: install.py's setup builds a trainer environment from it, and the demo trains there
(in folders with spaces and a path longer than 260 characters, as Windows users' WebUIs often are).

The environment is cached per machine (tests/trainer_env_support.py; `tools/setup.sh dev` builds it), so with the
cache this costs one small training run.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import trainer_env_support as support
from jobs_support import config_without_name, statuses

from kohya_backend.assets.demo import prepare_demo
from kohya_backend.host.trainer_env import probe_version, read_state, venv_python
from kohya_backend.jobs.progress import log_tail
from kohya_backend.jobs.runner import RUN_NAME, LocalRunner
from kohya_backend.jobs.scheduler import Scheduler
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import JobStore

S = JobStatus


@pytest.mark.slow
def test_the_demo_trains_in_a_python_3_10_trainer_environment(tmp_path: Path) -> None:
    python310 = support.find_python310()
    if python310 is None:
        pytest.skip("no Python 3.10 on this machine (tools/setup.sh dev warns about it too)")
    folder, problem = support.ensure(python310)
    assert not problem, problem
    state = read_state(folder) or {}
    assert state["python"] == [3, 10] and state["ready"] is True
    python = venv_python(folder)
    assert probe_version([str(python)]) == (3, 10)
    # It holds the 3.10 pins, not requirements-trainer.txt's (whose diffusers and transformers need 3.11).
    versions = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version as v; print(v('diffusers'), v('transformers'))"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.split()  # fmt: skip
    pins = dict(line.split("==") for line in support.spec().pins((3, 10)) if "==" in line and ";" not in line)
    assert versions == [pins["diffusers"], pins["transformers"]]

    # Paths with spaces, longer than Windows' classic 260 characters: nothing may split or cut them.
    root = tmp_path / "web ui" / "Train Management home"
    while len(str(root)) < 270:
        root = root / "a folder with spaces"
    home = root / "home"
    lora_dir = root / "models" / "Lora"
    demo = prepare_demo(tmp_path / "demo", fm_type="sd_1_5", steps=4).read_text(encoding="utf-8")
    sched = Scheduler(JobStore(home), [LocalRunner([str(python)])], devices={"cpu": 1}, lora_dir=lora_dir)
    job = sched.submit(
        fm_type="sd_1_5", model="demo-sd_1_5.safetensors", dataset="demo", instance_type="local",
        output_name="py310", config_toml=config_without_name(demo, max_train_steps=4),
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not sched.store.get(job.id).status.is_terminal:
        assert time.monotonic() < deadline, log_tail(job.folder)
        sched.tick()
        time.sleep(0.1)
    done = sched.store.get(job.id)
    assert done.status is S.COMPLETED, f"{done.reason}\n{log_tail(done.folder)}"
    assert statuses(sched.store, job.id) == [S.QUEUED, S.PREPARING, S.TRAINING, S.SAVING, S.COMPLETED]
    assert json.loads((done.folder / RUN_NAME).read_text())["command"][0] == str(python)
    assert done.progress["step"] == 4 and (lora_dir / "py310.safetensors").stat().st_size > 0
