"""The job folder's JSON files (run.json, result.json): one atomic writer, safe across threads."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs import runner
from kohya_backend.train.device import DEVICE_ENV


def test_run_json_has_one_atomic_writer_safe_across_threads(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(200):
                runner.write_json_atomic(target, {"worker": worker, "i": i})
        except BaseException as exc:  # a shared temporary name makes one thread's rename miss
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_file_holding_secrets_is_never_readable_by_others(tmp_path: Path) -> None:
    target = tmp_path / "workers.json"
    leftover = tmp_path / f".workers.json.{os.getpid()}.{threading.get_ident()}.tmp"
    leftover.write_text("{}")  # a crashed writer's temporary file, readable by everyone
    leftover.chmod(0o644)
    runner.write_json_atomic(target, {"token": "secret"}, mode=0o600)
    assert target.stat().st_mode & 0o777 == 0o600 and runner.read_json(target) == {"token": "secret"}
    runner.write_json_atomic(target, {"token": "again"}, mode=0o600)
    assert target.stat().st_mode & 0o777 == 0o600
    assert leftover.read_text() == "{}"  # temporary names are new each time: a leftover is never written into


def test_the_trainer_is_told_which_kind_of_device_it_got() -> None:
    cuda = runner.trainer_env("cuda:1", base={})
    assert cuda[DEVICE_ENV] == "cuda" and cuda["CUDA_VISIBLE_DEVICES"] == "1"
    cpu = runner.trainer_env("cpu", base={"CUDA_VISIBLE_DEVICES": "0"})
    assert cpu[DEVICE_ENV] == "cpu" and cpu["CUDA_VISIBLE_DEVICES"] == ""  # no GPU to pick up
    mps = runner.trainer_env("mps", base={})
    assert mps[DEVICE_ENV] == "mps" and "CUDA_VISIBLE_DEVICES" not in mps
    assert DEVICE_ENV not in runner.trainer_env(None, base={})  # the trainer takes the best it finds
    with pytest.raises(TrainManagementError, match="unknown device") as err:
        runner.trainer_env("mps:0", base={})
    assert "'mps' (Apple silicon)" in (err.value.hint or "")
