"""The job-folder contract: paths every reader and writer share, the trainer's events carry exactly the fields of
their records, progress reads the fields the trainer writes, and every small file is written atomically."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO, get_type_hints

import pytest

from kohya_backend.fileio import atomic_write, write_json_atomic
from kohya_backend.job_folder import EVENT_KINDS, EVENT_RECORDS, JobFolder, ResultRecord, StepEvent
from kohya_backend.jobs.progress import has_saved_state, summarize
from kohya_backend.train.events import EVENT_KINDS as TRAINER_KINDS
from kohya_backend.train.events import EventLog


def test_paths_of_a_job_folder(tmp_path: Path) -> None:
    folder = JobFolder(tmp_path)
    assert [p.name for p in (folder.config, folder.events, folder.log, folder.result, folder.run)] == [
        "config.toml",
        "events.jsonl",
        "train.log",
        "result.json",
        "run.json",
    ]
    assert folder.lora("cat") == tmp_path / "output" / "cat.safetensors"
    assert folder.samples == tmp_path / "output" / "sample"
    assert folder.state_dir("cat") == tmp_path / "output" / "cat-state"
    assert not folder.has_saved_state()
    (folder.state_dir("cat") / ".tmp-state-00000004-12").mkdir(parents=True)
    assert not has_saved_state(tmp_path)  # a half-written state does not count
    (folder.state_dir("cat") / "state-00000004").mkdir()
    assert has_saved_state(tmp_path)


def test_the_trainer_writes_the_records_and_progress_reads_them() -> None:
    assert TRAINER_KINDS == EVENT_KINDS
    seen: list[dict] = []
    log = EventLog(None, console=None, total_steps=3, total_epochs=1)
    log.subscribe(seen.append)
    log.step(step=1, epoch=1, loss=0.5, lrs=[1e-4, 1e-3])
    log.step(step=2, epoch=1, loss=0.25, lrs=[1e-4, 1e-3])
    step = seen[-1]
    assert set(step) - {"t", "kind"} == set(get_type_hints(StepEvent))
    progress = summarize(seen, []).progress
    # every field progress shows comes from the record under the same name (it_per_s was renamed on the way once)
    assert progress["it_per_s"] == step["it_per_s"] is not None
    assert (progress["loss"], progress["avg_loss"], progress["lrs"]) == (0.25, 0.375, [1e-4, 1e-3])
    assert (progress["step"], progress["total_steps"]) == (2, 3)
    assert set(EVENT_RECORDS) == set(EVENT_KINDS)
    assert set(get_type_hints(ResultRecord)) == {"status", "output", "step", "epoch", "error"}


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    atomic_write(path, "a = 1\n")
    assert path.read_text() == "a = 1\n"

    def fail_midway(handle: IO[bytes], data: memoryview) -> None:
        handle.write(data[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, "a = 2\n" * 100, write=fail_midway)
    assert path.read_text() == "a = 1\n" and sorted(os.listdir(tmp_path)) == ["config.toml"]
    write_json_atomic(tmp_path / "token.json", {"token": "s"}, mode=0o600)
    assert stat.S_IMODE((tmp_path / "token.json").stat().st_mode) == 0o600
    assert (tmp_path / "token.json").read_text() == '{\n  "token": "s"\n}'
