"""The job folder's JSON files (run.json, result.json): one atomic writer, safe across threads."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from kohya_backend.jobs import runner


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
