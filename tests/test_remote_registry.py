"""The worker registry (HOME/workers.json): tokens kept out of every listing and repr."""

from __future__ import annotations

from pathlib import Path

from kohya_backend.jobs.registry import WorkerRegistry
from kohya_backend.service.workers_api import WorkerRequest

SECRET = "registry-secret-token-0123"


def test_no_object_holding_a_worker_token_prints_it(tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path)
    entry = registry.add("http://127.0.0.1:7870", SECRET, name="box")
    shown = [repr(entry), str(entry), repr(registry.entries()), str(entry.public()), repr(registry)]
    request = WorkerRequest(url="http://127.0.0.1:7870", token=SECRET)
    shown += [repr(request), str(request)]
    assert all(SECRET not in text for text in shown), shown
    assert registry.require("box").token == SECRET and request.token == SECRET
