"""`python -m kohya_backend worker` and `workers add|list|remove` through the real CLI, plus ensure_worker()."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from remote_support import free_port, wait_healthy
from server_support import stranger

import kohya_backend
from kohya_backend.assets.demo import prepare_demo
from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.registry import WorkerRegistry, ensure_worker
from kohya_backend.jobs.worker_protocol import WORKER_PREFIX
from kohya_backend.service.worker import (
    WorkerSetupError,
    build_worker,
    create_worker_app,
    describe,
    reachable_urls,
)

ROOT = str(Path(kohya_backend.__file__).resolve().parent.parent)


def _cli(
    *args: str, stdin: str | None = None, token_env: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TRAIN_MANAGEMENT_WORKER_TOKEN", None)
    if token_env is not None:
        env["TRAIN_MANAGEMENT_WORKER_TOKEN"] = token_env
    return subprocess.run(
        [sys.executable, "-m", "kohya_backend", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=120,
    )


def test_worker_refuses_to_start_without_a_real_token(tmp_path: Path) -> None:
    home = str(tmp_path / "worker")
    missing = _cli("worker", "--home", home, "--port", str(free_port()))
    assert missing.returncode == 2 and "needs a token" in missing.stderr
    weak = tmp_path / "weak.txt"
    weak.write_text("short\n")
    refused = _cli("worker", "--home", home, "--token-file", str(weak))
    assert refused.returncode == 2 and "shorter than 16" in refused.stderr
    absent = _cli("worker", "--home", home, "--token-file", str(tmp_path / "nope.txt"))
    assert absent.returncode == 2 and "--create-token" in absent.stderr
    short = _cli("worker", "--home", home, "--port", str(free_port()), token_env="short-env-token")
    assert short.returncode == 2 and "TRAIN_MANAGEMENT_WORKER_TOKEN is shorter than 16" in short.stderr
    assert not (tmp_path / "worker").exists()  # refused before anything was made
    with pytest.raises(WorkerSetupError, match="shorter than 16"):
        create_worker_app(build_worker(tmp_path / "app", devices={"cpu": 1}), token="short-token")


def test_worker_prints_where_it_serves_and_the_workers_commands_manage_the_registry(tmp_path: Path) -> None:
    token_file = tmp_path / "token.txt"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [
        sys.executable,
        "-m",
        "kohya_backend",
        "worker",
        "--port",
        str(port),
        "--home",
        str(tmp_path / "w"),
    ]
    command += ["--token-file", str(token_file), "--create-token", "--forwarded-allow-ips", "127.0.0.2"]
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        banner = log.read_text()
        assert f"Train Management worker on http://127.0.0.1:{port}" in banner
        assert "GPU: none found" in banner and "GiB in" in banner
        assert token_file.stat().st_mode & 0o077 == 0 and len(token_file.read_text().strip()) >= 32
        token = token_file.read_text().strip()
        assert token not in banner

        client = str(tmp_path / "client")
        added = _cli(
            "workers", "add", f"http://127.0.0.1:{port}/", "--token-file", str(token_file), "--home", client
        )
        assert added.returncode == 0, added.stderr
        assert "online, CPU" in added.stdout and f"worker:127.0.0.1-{port}" in added.stderr
        name = f"127.0.0.1-{port}"
        renamed = _cli(
            "workers", "add", f"http://127.0.0.1:{port}", "--name", "box", "--home", client, stdin=token
        )
        assert renamed.returncode == 2 and f"already registered as '{name}'" in renamed.stderr
        again = _cli("workers", "add", f"http://127.0.0.1:{port}", "--home", client, stdin=token)
        assert again.returncode == 0 and again.stdout.startswith(f"updated the token of {name} ")
        listed = _cli("workers", "list", "--json", "--home", client)
        rows = json.loads(listed.stdout)
        assert [(r["name"], r["state"], r["gpu"]) for r in rows] == [(name, "online", "CPU")]
        assert token not in listed.stdout and token not in _cli("workers", "list", "--home", client).stdout
        assert _cli("workers", "remove", name, "--home", client).returncode == 0
        gone = _cli("workers", "remove", name, "--home", client)
        assert gone.returncode == 2 and f"no worker named '{name}'" in gone.stderr
        # A refused token is logged under its client, which X-Forwarded-For names only from the named proxy.
        info = f"http://127.0.0.1:{port}{WORKER_PREFIX}/info"
        assert httpx.get(info, headers={"X-Forwarded-For": "10.9.9.1"}).status_code == 401
        with stranger("127.0.0.2") as proxy:
            assert proxy.get(info, headers={"X-Forwarded-For": "10.9.9.2"}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(15)
    logged = log.read_text()
    assert "failed worker token from 127.0.0.1 " in logged and "failed worker token from 10.9.9.2 " in logged
    assert "10.9.9.1" not in logged


def test_ensure_worker_registers_from_a_token_file_for_the_webui_flags(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "token.txt"
    token_file.write_text("the-token-from-the-worker\n")
    with caplog.at_level(logging.WARNING):
        entry = ensure_worker(tmp_path / "home", "http://gpu-box:7870", token_file=token_file)
    assert {k: entry[k] for k in ("name", "url")} == {"name": "gpu-box-7870", "url": "http://gpu-box:7870"}
    assert (
        "plain http" in entry["warning"] and entry["warning"] in caplog.text
    )  # the WebUI's console shows it
    token_file.write_text("a-new-token-after-a-restart\n")
    ensure_worker(tmp_path / "home", "http://gpu-box:7870/", token_file=token_file)
    registry = WorkerRegistry(tmp_path / "home")
    assert [(e.name, e.token) for e in registry.entries()] == [
        ("gpu-box-7870", "a-new-token-after-a-restart")
    ]
    assert (tmp_path / "home" / "workers.json").stat().st_mode & 0o077 == 0
    with pytest.raises(TrainManagementError, match="needs a token"):
        ensure_worker(tmp_path / "home", "http://other:7870")
    with pytest.raises(TrainManagementError, match="cannot read"):
        ensure_worker(tmp_path / "home", "http://other:7870", token_file=tmp_path / "missing.txt")


def test_a_worker_on_every_interface_prints_urls_a_client_can_use(tmp_path: Path) -> None:
    worker = build_worker(tmp_path / "w", devices={"cpu": 1})
    banner = describe(worker, "0.0.0.0", 7870)
    assert "0.0.0.0" not in banner
    first = banner.splitlines()[0]
    assert first.startswith(f"Train Management worker on http://{socket.gethostname()}:7870 ")
    assert "also reachable as http://127.0.0.1:7870" in banner
    both = reachable_urls("::", 7870)
    assert both[-1] in ("http://127.0.0.1:7870", "http://[::1]:7870")  # loopback last
    assert all("[" in url for url in both if url.count(":") > 2)  # IPv6 addresses in brackets
    assert reachable_urls("10.1.2.3", 7870) == ["http://10.1.2.3:7870"]


def test_jobs_submit_sends_a_job_to_a_worker_with_instance_type(tmp_path: Path) -> None:
    home = tmp_path / "home"
    prepare_demo(home, fm_type="sd_1_5", steps=2)
    WorkerRegistry(home).add("http://127.0.0.1:9", "a-worker-token-0123", name="box")
    config = tmp_path / "config.toml"
    config.write_text('resolution = "64,64"\nmax_train_steps = 2\nnetwork_dim = 4\nmixed_precision = "no"\n')
    base = ["jobs", "submit", "--home", str(home), "--model", "demo-sd_1_5.safetensors", "--dataset", "demo"]
    base += ["--fm-type", "sd_1_5", "--config", str(config)]
    sent = _cli(*base, "--instance-type", "worker:box")
    assert sent.returncode == 0, sent.stderr
    shown = json.loads(_cli("jobs", "show", sent.stdout.strip(), "--home", str(home)).stdout)
    assert shown["instance_type"] == "worker:box" and shown["status"] == "queued"
    unknown = _cli(*base, "--instance-type", "worker:nope")
    assert unknown.returncode == 2 and "worker:nope" in unknown.stderr and "worker:box" in unknown.stderr
    config.write_text(config.read_text() + 'output_name = "here"\n')
    here = _cli(*base)
    assert here.returncode == 0, here.stderr
    assert (
        json.loads(_cli("jobs", "show", here.stdout.strip(), "--home", str(home)).stdout)["instance_type"]
        == "local"
    )


def test_workers_add_warns_when_the_token_would_travel_over_plain_http(tmp_path: Path) -> None:
    home = str(tmp_path / "client")
    added = _cli(
        "workers", "add", "http://gpu-box.invalid:7870", "--home", home, stdin="a-worker-token-0123\n"
    )
    assert added.returncode == 0, added.stderr
    assert "warning: the worker token goes to gpu-box.invalid over plain http" in added.stderr
    assert "TLS reverse proxy" in added.stderr
    listed = _cli("workers", "list", "--home", home)
    assert "warning: gpu-box.invalid-7870: the worker token goes to" in listed.stderr
    local = _cli("workers", "add", "http://127.0.0.1:9", "--home", home, stdin="a-worker-token-0123\n")
    assert local.returncode == 0 and "warning" not in local.stderr
