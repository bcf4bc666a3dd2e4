"""The worker registry (HOME/workers.json): tokens kept out of every listing and repr, names that stay put."""

from __future__ import annotations

from pathlib import Path

import pytest

from kohya_backend.jobs.registry import WorkerConflict, WorkerRegistry
from kohya_backend.jobs.worker_protocol import plain_http_warning
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


def test_a_registered_url_keeps_its_name_and_no_worker_is_replaced_silently(tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path)
    first = registry.add("http://gpu-box:7870", SECRET)
    assert first.name == "gpu-box-7870"
    with pytest.raises(WorkerConflict, match="already registered as 'gpu-box-7870'; it keeps that name"):
        registry.add("http://gpu-box:7870/", "another-token-0123", name="box")
    again = registry.add("http://gpu-box:7870", "another-token-0123")  # no name: the token is updated
    assert (again.name, again.token, again.added_at) == ("gpu-box-7870", "another-token-0123", first.added_at)
    registry.add("http://other:7870", SECRET, name="other")
    with pytest.raises(WorkerConflict, match="'other' is already registered, at http://other:7870"):
        registry.add("https://other", SECRET)  # its default name, 'other', is another worker's
    moved = registry.add("http://other:7871", SECRET, name="other")  # named explicitly: moved to a new URL
    assert [(e.name, e.url) for e in registry.entries()] == [
        ("gpu-box-7870", "http://gpu-box:7870"),
        ("other", "http://other:7871"),
    ] and moved.name == "other"


def test_a_token_sent_over_plain_http_off_this_machine_is_warned_about(tmp_path: Path) -> None:
    for url in (
        "http://gpu-box:7870",
        "http://10.0.0.5:7870",
        "http://[fd00::2]:7870",
        "http://0.0.0.0:7870",
    ):
        warning = plain_http_warning(url)
        assert warning is not None and "plain http" in warning and "TLS" in warning, url
    for url in ("https://gpu-box", "http://127.0.0.1:7870", "http://127.8.9.1", "http://localhost:7870",
                "http://[::1]:7870", "http://box.localhost:7870"):  # fmt: skip
        assert plain_http_warning(url) is None, url
    registry = WorkerRegistry(tmp_path)
    far = registry.add("http://gpu-box:7870", SECRET).public()
    assert far["warning"] == plain_http_warning("http://gpu-box:7870")
    assert registry.add("https://gpu-box:8443", SECRET).public()["warning"] is None
    assert "warning" not in (tmp_path / "workers.json").read_text()  # derived from the URL, never stored
