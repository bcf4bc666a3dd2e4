"""Runners start, watch and stop the trainer process of a job; the local one runs it as a child process.

Every runner speaks the same small interface (`Runner`), so the scheduler does not care whether a job trains
here, on a remote worker or (later) on SageMaker. Files in the job folder are the contract with the trainer:
`config.toml` in; `events.jsonl`, `result.json`, `train.log` and `output/` out; `run.json` records which
process works on the job so that a restarted host can find it again without ever signalling a recycled pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import psutil

import kohya_backend
from kohya_backend.errors import TrainManagementError
from kohya_backend.families import FM_TYPES
from kohya_backend.fileio import write_json_atomic as write_json_atomic
from kohya_backend.job_folder import EVENTS_NAME as EVENTS_NAME
from kohya_backend.job_folder import LOG_NAME as LOG_NAME
from kohya_backend.job_folder import RESULT_NAME as RESULT_NAME
from kohya_backend.job_folder import RUN_NAME as RUN_NAME
from kohya_backend.jobs import processes
from kohya_backend.jobs.allocation import gpus_of, processes_for
from kohya_backend.jobs.devices import device_kind
from kohya_backend.jobs.store import Job
from kohya_backend.train.device import DEVICE_ENV

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass(frozen=True)
class RunHandle:
    """One trainer process: its pid and process group, identified by its start time (so a reused pid never matches)."""

    job_id: str
    runner: str
    pid: int
    pgid: int
    create_time: float
    device: str | None = None

    @property
    def key(self) -> tuple[int, float]:
        """The identity of the process: pid plus the time it started."""
        return (self.pid, self.create_time)


@dataclass(frozen=True)
class RunStatus:
    """What a poll found: `exit_code` is None while alive, and also when the process was not our child.

    `lost` is set by runners that lose sight of a trainer they do not own (a remote worker stopped answering, or
    its job was interrupted or cancelled there): the job becomes interrupted (cancelled when cancelling) with it
    as the reason.
    """

    alive: bool
    exit_code: int | None = None
    lost: str | None = None


class Runner(Protocol):
    """Starts, polls, cancels and re-attaches to a job's trainer; the scheduler knows runners only by this."""

    name: str

    def start(self, job: Job, *, resume: bool, device: str | None = None) -> RunHandle:
        """Launch the trainer for `job` (continuing from its saved state when `resume`)."""
        ...

    def poll(self, handle: RunHandle) -> RunStatus:
        """Whether the trainer still runs and, once it ended, its exit code when known."""
        ...

    def cancel(self, handle: RunHandle, *, grace_s: float) -> None:
        """Ask the trainer to stop (it saves state first); force it after `grace_s` seconds. Returns at once."""
        ...

    def attach(self, job: Job) -> RunHandle | None:
        """Find the job's trainer again after a restart of this host process, or None when it is gone."""
        ...


@runtime_checkable
class PlacingRunner(Runner, Protocol):
    """A runner that trains on machines of its own (remote workers) instead of this host's devices.

    Its instance types are its name or `name:target`; the scheduler asks it where a queued job goes.
    """

    def check_instance_type(self, instance_type: str) -> None:
        """Raise TrainManagementError (saying what exists) unless jobs may be submitted to `instance_type`."""
        ...

    def place(self, job: Job) -> str | None:
        """The device (e.g. 'worker:gpu-box') the queued `job` starts on now, or None to keep it queued."""
        ...

    def may_place(self) -> bool:
        """Cheap, from what the runner already knows: False when place() would keep every queued job queued."""
        ...


def trainer_command(python: Sequence[str], job: Job, *, resume: bool, processes: int = 1) -> list[str]:
    """The command line that trains `job`: always kohya_backend's `train --job DIR` (with `--num-processes N` for
    a data-parallel job)."""
    if job.fm_type not in FM_TYPES:
        raise TrainManagementError(
            f"job {job.id} has FM type {job.fm_type!r}, which the trainer does not train",
            f"submit it again with one of: {', '.join(FM_TYPES)}",
        )
    folder = str(job.folder.resolve())  # absolute, so attach() recognises it whatever the host's cwd
    command = [*python, "-m", "kohya_backend", "train", "--job", folder, "--fm-type", job.fm_type]
    if processes > 1:
        command += ["--num-processes", str(processes)]
    return [*command, "--resume"] if resume else command


def trainer_env(device: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The trainer's environment: offline hub, unbuffered output, kohya_backend importable, one device visible."""
    env = dict(os.environ if base is None else base)
    env.update(_OFFLINE_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    package_root = str(Path(kohya_backend.__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != package_root]
    env["PYTHONPATH"] = os.pathsep.join([package_root, *paths])
    if device is not None:
        try:
            kind = device_kind(device)
        except ValueError:
            raise TrainManagementError(
                f"unknown device {device!r}",
                "use 'cpu', 'mps' (Apple silicon), 'cuda:N' with N the GPU's index, e.g. 'cuda:0', or GPUs "
                "together, e.g. 'cuda:0,1'",
            ) from None
        env[DEVICE_ENV] = kind  # the trainer trains on this kind, or says why it cannot
        if kind != "mps":
            # Device indices are nvidia-smi's (PCI bus order); CUDA numbers GPUs fastest-first unless told
            # otherwise. The CPU gets none, so torch cannot pick one up.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] if kind == "cuda" else ""
    return env


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _process(handle: RunHandle) -> psutil.Process | None:
    """The live (or zombie) process of `handle`, or None when that very process no longer exists."""
    return processes.find(handle.pid, handle.create_time)


class LocalRunner:
    """Runs each job's trainer as a child process in its own process group on this machine (POSIX or Windows).

    `python` is the interpreter (plus any leading arguments) that runs `-m kohya_backend train`; the default is
    this process's interpreter. It is only a prefix: the command always runs kohya_backend's trainer.
    """

    name = "local"

    def __init__(self, python: Sequence[str] | None = None) -> None:
        self.python: tuple[str, ...] = tuple(python) if python else (sys.executable,)
        self._children: dict[tuple[int, float], subprocess.Popen[bytes]] = {}
        self._exit_codes: dict[tuple[int, float], int] = {}
        self._lock = threading.Lock()

    def start(self, job: Job, *, resume: bool, device: str | None = None) -> RunHandle:
        """Launch `python -m kohya_backend train --job DIR` detached in its own group, output to DIR/train.log; a job
        given several GPUs (or the CPU standing in for them) trains in one process per GPU under its launcher."""
        folder = job.folder
        count = processes_for(device, gpus_of(job.params))
        command = trainer_command(self.python, job, resume=resume, processes=count)
        env = trainer_env(device)
        # A previous run's outcome must not be read as this one's.
        (folder / RESULT_NAME).unlink(missing_ok=True)
        with open(folder / LOG_NAME, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== {stamp} start{' (resume)' if resume else ''}: {' '.join(command)}\n".encode())
            log.flush()
            try:
                popen = processes.spawn(command, cwd=folder, env=env, stdout=log)
            except OSError as exc:
                raise TrainManagementError(
                    f"could not start the trainer for job {job.id} with {self.python[0]}: {exc.strerror or exc}",
                    "check that the Python interpreter configured for training exists and is executable",
                ) from exc
        try:
            handle = self._record(popen, job, command, resume=resume, device=device)
        except BaseException:
            # Untracked, it would train on unseen: a failed start leaves no trainer behind.
            processes.kill_tree(popen.pid, popen.pid)
            popen.wait()
            raise
        with self._lock:
            self._children[handle.key] = popen
        return handle

    def _record(
        self,
        popen: subprocess.Popen[bytes],
        job: Job,
        command: list[str],
        *,
        resume: bool,
        device: str | None,
    ) -> RunHandle:
        """Identify the new trainer and write DIR/run.json, which attach() reads after a restart."""
        # An exited but unreaped child still answers, so this cannot miss even a trainer that died at once.
        create_time = processes.create_time(popen.pid)
        handle = RunHandle(job.id, self.name, popen.pid, popen.pid, create_time, device)
        info = {
            "runner": self.name,
            "pid": handle.pid,
            "pgid": handle.pgid,
            "create_time": create_time,
            "device": device,
            "resume": resume,
            "started_at": time.time(),
            "command": command,
        }
        write_json_atomic(job.folder / RUN_NAME, info)
        return handle

    def poll(self, handle: RunHandle) -> RunStatus:
        """Alive or not; the exit code (negative: killed by that signal) when the trainer was our child."""
        with self._lock:
            if handle.key in self._exit_codes:
                return RunStatus(False, self._exit_codes[handle.key])
            popen = self._children.get(handle.key)
        if popen is not None:
            code = popen.poll()
            if code is None:
                return RunStatus(True, None)
            with self._lock:  # reaped: keep only the exit code
                self._exit_codes[handle.key] = code
                self._children.pop(handle.key, None)
            return RunStatus(False, code)
        proc = _process(handle)
        if proc is None:
            return RunStatus(False, None)
        reaped = processes.reap(handle.pid)
        if reaped is None:
            # Not our child (we were restarted): its exit code goes to its new parent, result.json tells the rest.
            return RunStatus(not processes.is_zombie(proc), None)
        alive, code = reaped
        if alive or code is None:
            return RunStatus(True, None)
        with self._lock:
            self._exit_codes[handle.key] = code
        return RunStatus(False, code)

    def cancel(self, handle: RunHandle, *, grace_s: float) -> None:
        """Ask the trainer's group to stop now (SIGTERM; CTRL_BREAK on Windows); after `grace_s` s, if that same
        process still runs, end its whole tree (SIGKILL to the group; terminating the tree on Windows)."""
        if self._signal(handle, processes.request_stop):
            timer = threading.Timer(max(0.0, grace_s), self._escalate, args=(handle,))
            timer.daemon = True
            timer.start()

    def _escalate(self, handle: RunHandle) -> None:
        if self.poll(handle).alive:
            self._signal(handle, processes.kill_tree)

    def _signal(self, handle: RunHandle, action: Callable[[int, int], bool]) -> bool:
        """Act on the group only while its leader is verifiably the trainer we started (never a recycled pid)."""
        with self._lock:
            if handle.key in self._exit_codes:
                return False
            popen = self._children.get(handle.key)
        if popen is not None and popen.returncode is not None:
            return False
        if popen is None and _process(handle) is None:
            return False
        return action(handle.pid, handle.pgid)

    def attach(self, job: Job) -> RunHandle | None:
        """The job's trainer if the process recorded in DIR/run.json still exists and is that very trainer."""
        info = read_json(job.folder / RUN_NAME)
        if info is None or info.get("runner") != self.name:
            return None
        try:
            pid, pgid, create_time = int(info["pid"]), int(info["pgid"]), float(info["create_time"])
        except (KeyError, TypeError, ValueError):
            return None
        device = info.get("device") if isinstance(info.get("device"), str) else None
        handle = RunHandle(job.id, self.name, pid, pgid, create_time, device)
        proc = _process(handle)
        if proc is None:
            return None
        if not processes.is_zombie(proc) and not _runs_job(proc, job):
            return None  # a zombie has no command line left; its start time matched, which is enough
        return handle


def _runs_job(proc: psutil.Process, job: Job) -> bool:
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return "kohya_backend" in cmdline and "--job" in cmdline and str(job.folder.resolve()) in cmdline
