"""`python -m kohya_backend jobs ...` in real subprocesses on a home with the tiny demo model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from server_support import stranger

CONFIG = """\
tokenizer_cache_dir = "{tokenizer}"
caption_extension = ".txt"
resolution = "64,64"
enable_bucket = false
train_batch_size = 2
max_train_steps = 2
network_dim = 4
network_alpha = 4
mixed_precision = "no"
output_name = "{name}"
"""


def _cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "kohya_backend", "jobs", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def home(demo_home: Path) -> Path:
    return demo_home


def _submit(home: Path, tmp_path: Path, name: str) -> str:
    config = tmp_path / f"{name}.toml"
    config.write_text(CONFIG.format(tokenizer=(home / "models" / "tokenizer").as_posix(), name=name))
    done = _cli(home, "submit", "--model", "demo-sd_1_5.safetensors", "--dataset", "demo",
                "--fm-type", "sd_1_5", "--config", str(config))  # fmt: skip
    return done.stdout.strip()


def test_submit_run_list_show_logs_delete(home: Path, tmp_path: Path) -> None:
    job_id = _submit(home, tmp_path, "cli-lora")
    listed = json.loads(_cli(home, "list", "--json").stdout)
    assert [j["id"] for j in listed["jobs"]] == [job_id] and listed["jobs"][0]["status"] == "queued"
    run = _cli(home, "run")
    assert f"{job_id}  completed" in run.stdout
    assert (home / "lora" / "cli-lora.safetensors").is_file()
    shown = json.loads(_cli(home, "show", job_id).stdout)
    assert shown["status"] == "completed" and shown["plan"]["total_steps"] == 2
    assert [t["to"] for t in shown["transitions"]][-1] == "completed"
    assert _cli(home, "logs", job_id).stdout.strip()
    assert _cli(home, "logs", job_id, "--follow").stdout.strip()
    assert job_id in _cli(home, "list", "--status", "completed").stdout
    assert job_id not in _cli(home, "list", "--status", "failed").stdout
    again = _cli(home, "resume", job_id, check=False)
    assert again.returncode == 2 and "completed" in again.stderr
    _cli(home, "delete", job_id)
    gone = _cli(home, "show", job_id, check=False)
    assert gone.returncode == 2 and "does not exist" in gone.stderr


def test_cancel_resume_and_errors(home: Path, tmp_path: Path) -> None:
    job_id = _submit(home, tmp_path, "to-cancel")
    assert "cancelled" in _cli(home, "cancel", job_id).stdout
    assert "queued" in _cli(home, "resume", job_id).stdout
    duplicate = _cli(home, "submit", "--model", "demo-sd_1_5.safetensors", "--dataset", "demo",
                     "--fm-type", "sd_1_5", "--config", str(tmp_path / "to-cancel.toml"), check=False)  # fmt: skip
    assert duplicate.returncode == 2 and "already used" in duplicate.stderr
    unknown = _cli(home, "submit", "--model", "nope.safetensors", "--dataset", "demo",
                   "--fm-type", "sd_1_5", "--config", str(tmp_path / "to-cancel.toml"), check=False)  # fmt: skip
    assert unknown.returncode == 2 and "demo-sd_1_5.safetensors" in unknown.stderr
    mismatch = _cli(home, "submit", "--model", "demo-sd_1_5.safetensors", "--dataset", "demo",
                    "--fm-type", "sd_xl", "--config", str(tmp_path / "to-cancel.toml"), check=False)  # fmt: skip
    assert mismatch.returncode == 2 and "FM type sd_xl" in mismatch.stderr
    bad_id = _cli(home, "show", "../etc", check=False)
    assert bad_id.returncode == 2 and "not a valid job id" in bad_id.stderr
    _cli(home, "cancel", job_id)
    _cli(home, "delete", job_id)
    assert json.loads(_cli(home, "list", "--json").stdout)["total"] == 0


def test_serve_answers_and_refuses_an_open_network_api(tmp_path: Path) -> None:
    import socket
    import time

    import httpx

    refused = subprocess.run(
        [sys.executable, "-m", "kohya_backend", "serve", "--host", "0.0.0.0", "--home", str(tmp_path / "h")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and "without a token" in refused.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    wildcard = subprocess.run(
        [sys.executable, "-m", "kohya_backend", "serve", "--allowed-hosts", "*", "--home", str(tmp_path / "h")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert wildcard.returncode == 2 and "--allowed-hosts '*' without a token" in wildcard.stderr
    assert "DNS rebinding" in wildcard.stderr and not (tmp_path / "h").exists()
    errors = tmp_path / "serve.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kohya_backend", "serve", "--port", str(port), "--home", str(tmp_path / "h"),
         "--token", "t0k", "--forwarded-allow-ips", "127.0.0.2"],
        stdout=subprocess.PIPE, stderr=errors.open("w"), text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert f"http://127.0.0.1:{port}/train-management/v1" in proc.stdout.readline()
        base = f"http://127.0.0.1:{port}/train-management/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(f"{base}/trainings", headers={"Authorization": "Bearer t0k"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not answer"
                time.sleep(0.2)
        assert answer.status_code == 200 and answer.json()["total"] == 0
        # X-Forwarded-For names the client only when the proxy named by --forwarded-allow-ips sends it.
        assert httpx.get(f"{base}/trainings", headers={"X-Forwarded-For": "10.9.9.1"}).status_code == 401
        with stranger("127.0.0.2") as proxy:
            assert proxy.get(f"{base}/trainings", headers={"X-Forwarded-For": "10.9.9.2"}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(30)
    logged = errors.read_text(encoding="utf-8")
    assert "failed API token from 127.0.0.1 " in logged and "failed API token from 10.9.9.2 " in logged
    assert "10.9.9.1" not in logged and "from 127.0.0.2" not in logged
