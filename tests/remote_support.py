"""Real workers for the remote tests: `python -m kohya_backend worker` as a subprocess, or its app in a thread."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import uvicorn
from server_support import free_port, running

import kohya_backend
from kohya_backend.jobs.worker_protocol import WORKER_PREFIX
from kohya_backend.service.worker import Worker, create_worker_app

TOKEN = "worker-test-token-0123456789"


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{WORKER_PREFIX}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"worker {url} did not come up")


class WorkerProcess:
    """A worker started through the real CLI on 127.0.0.1 (killable, restartable on the same home and port)."""

    def __init__(self, home: Path, token_file: Path, *, port: int | None = None) -> None:
        self.home = home
        self.token_file = token_file
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home.parent / f"{home.name}.log"

    def start(self) -> WorkerProcess:
        env = dict(os.environ)
        root = str(Path(kohya_backend.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "kohya_backend", "worker", "--port", str(self.port)]
        command += ["--token-file", str(self.token_file), "--home", str(self.home)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_healthy(self.url)
        return self

    def kill(self) -> None:
        """SIGKILL the worker process only (its trainers, in their own sessions, keep running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def kill_trainers(self) -> None:
        """Kill every trainer still training a job of this worker's home."""
        home = str(self.home.resolve())
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if "--job" in cmdline and any(home in part for part in cmdline):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill_trainers()


class WorkerThread:
    """A worker app served by uvicorn in a thread (its scheduler is not started: jobs stay queued)."""

    def __init__(self, worker: Worker, token: str = TOKEN) -> None:
        self.worker = worker
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_worker_app(worker, token=token), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        wait_healthy(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


__all__ = ["TOKEN", "WorkerProcess", "WorkerThread", "free_port", "running", "wait_healthy"]
