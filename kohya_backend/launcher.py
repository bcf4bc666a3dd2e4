"""Data-parallel training on this machine: `train --num-processes N` runs N copies of the trainer, one per GPU
(or N on the CPU), and supervises them; each reads its place (RANK, WORLD_SIZE, LOCAL_RANK) from the environment,
as under `accelerate launch` or `torchrun`.

Written here rather than through torch.distributed.run, whose elastic agent starts every worker in a session of its
own: the job's stop and kill (SIGTERM/SIGKILL to the trainer's process group, jobs/processes.py) would not reach
the workers, and a killed agent would leave them training. Here the workers stay in the launcher's group.

The rendezvous listens on 127.0.0.1 only: the launcher binds a loopback socket on a free port and hands it to rank
0's TCPStore (POSIX), and gloo/NCCL are pointed at the loopback interface unless the environment names another.
Torch-free: the launcher only starts processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

import psutil

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.processes import stop_signals
from kohya_backend.train.process_env import LAUNCHED_ENV, LOOPBACK, STORE_FD_ENV

POSIX = os.name == "posix"
POLL_S = 0.2
FAILURE_GRACE_S = 15.0  # after one process failed, how long the others may take to end by themselves


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 ('lo' on Linux, 'lo0' on macOS), if found."""
    try:
        interfaces = psutil.net_if_addrs()
    except OSError:
        return None
    for name, addresses in interfaces.items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addresses):
            return name
    return None


def listen_loopback() -> socket.socket:
    """A socket listening on a free port of 127.0.0.1 (the rendezvous: nothing beyond this machine can reach it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    return sock


def worker_env(
    base: Mapping[str, str],
    *,
    rank: int,
    world_size: int,
    port: int,
    store_fd: int | None,
    cpu_count: int | None = None,
) -> dict[str, str]:
    """The environment of worker `rank`: its place in the run, the loopback rendezvous, and (unless set) the
    loopback interface for gloo/NCCL and an even share of the CPU threads."""
    env = dict(base)
    env.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "GROUP_RANK": "0",
            "MASTER_ADDR": LOOPBACK,
            "MASTER_PORT": str(port),
        }
    )
    env.pop(STORE_FD_ENV, None)
    env.pop(LAUNCHED_ENV, None)
    if POSIX:
        env[LAUNCHED_ENV] = "1"
    if store_fd is not None:
        env[STORE_FD_ENV] = str(store_fd)
    # N processes each using every core would fight over them; torchrun sets 1, the CPU trainer wants its share.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (cpu_count or os.cpu_count() or 1) // world_size)))
    interface = loopback_interface()
    if interface is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", interface)
        env.setdefault("NCCL_SOCKET_IFNAME", interface)
    return env


def describe_end(code: int) -> str:
    """'was killed by SIGKILL' or 'exited with code 1' for a worker's exit code (negative: a signal)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _cause_rank(code: int) -> int:
    """Of processes found ended at once, which most likely ended first: one killed by a signal, then one with its
    own error (2), then one that only lost its peers (1)."""
    return 0 if code < 0 else 1 if code == 2 else 2


def launcher_exit_code(codes: Sequence[int], first_failure: int | None) -> int:
    """The launcher's exit code from its workers': 0 all done, 3 stopped (a cancel: every one ended with 0 or 3),
    2 when the failure is one the user can act on (rank 0's, or the first failing process's, exit code 2), else 1."""
    if all(code == 0 for code in codes):
        return 0
    if all(code in (0, 3) for code in codes):
        return 3
    if codes[0] == 2 or (first_failure is not None and codes[first_failure] == 2):
        return 2
    return 1


class Launch:
    """N workers of one command, started in this process's group and supervised until all have ended.

    A stop signal (SIGTERM/SIGINT) is passed on once to every worker (they save and stop together); a second one
    kills them. When one worker fails, the others get FAILURE_GRACE_S to end by themselves (they notice the missing
    peer at their next collective), then are killed: no worker outlives the run.
    """

    def __init__(self, command: Sequence[str], num_processes: int, *, log: TextIO | None = None) -> None:
        if num_processes < 2:
            raise ValueError("a launch needs at least 2 processes")
        self.command = list(command)
        self.num_processes = num_processes
        self.log = log or sys.stderr
        self.port = 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self.codes: list[int | None] = []
        self.failure: str | None = None  # which process ended how, when the run failed
        self._signals = 0

    def _say(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            print(f"launcher: {text}", file=self.log, flush=True)

    def start(self) -> None:
        """Bind the loopback rendezvous and start the workers (rank 0 takes over the listening socket)."""
        sock = listen_loopback()
        self.port = int(sock.getsockname()[1])
        fd = sock.fileno()
        try:
            if not POSIX:
                sock.close()  # no descriptor passing: rank 0's store binds the port again (docs: Windows)
            for rank in range(self.num_processes):
                give = POSIX and rank == 0
                env = worker_env(
                    os.environ,
                    rank=rank,
                    world_size=self.num_processes,
                    port=self.port,
                    store_fd=fd if give else None,
                )
                self.procs.append(
                    subprocess.Popen(
                        self.command, env=env, stdin=subprocess.DEVNULL, pass_fds=(fd,) if give else ()
                    )
                )
        except OSError as exc:
            self.kill()
            raise TrainManagementError(
                f"could not start training process {len(self.procs)} of {self.num_processes}: {exc}",
                "check that the Python interpreter and the training environment are intact",
            ) from exc
        finally:
            sock.close()  # rank 0 holds the socket now: the port is free again once rank 0 ends
        self.codes = [None] * len(self.procs)
        pids = ", ".join(str(p.pid) for p in self.procs)
        self._say(
            f"{self.num_processes} training processes (pids {pids}), rendezvous on {LOOPBACK}:{self.port}"
        )

    def kill(self) -> None:
        """End every worker still running, now."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def _forward_stop(self, signum: int, _frame: object) -> None:
        self._signals += 1
        if self._signals == 1:
            self._say(f"{signal.Signals(signum).name}: asking every training process to stop")
            for proc in self.procs:
                if proc.poll() is None and POSIX:
                    proc.send_signal(signal.SIGTERM)  # a worker that had it already ignores the repeat
        else:
            self._say("asked again: ending the training processes now")
            self.kill()

    def wait(self) -> int:
        """Supervise the workers until all have ended; the launcher's exit code (launcher_exit_code)."""
        first_failure: int | None = None
        deadline: float | None = None
        while any(code is None for code in self.codes):
            ended = []
            for rank, proc in enumerate(self.procs):
                code = proc.poll() if self.codes[rank] is None else None
                if code is not None:
                    self.codes[rank] = code
                    ended.append(rank)
            failed = [rank for rank in ended if self.codes[rank] not in (0, 3)]
            if failed and first_failure is None:
                first_failure = min(failed, key=lambda rank: _cause_rank(int(self.codes[rank] or 0)))
                deadline = time.monotonic() + FAILURE_GRACE_S
                code = int(self.codes[first_failure] or 0)
                self._say(f"{self._who(first_failure)} {describe_end(code)}; the others stop too")
            if deadline is not None and time.monotonic() > deadline:
                self._say("the other training processes did not end by themselves: ending them")
                self.kill()
                deadline = None
            time.sleep(POLL_S)
        codes = [int(c) for c in self.codes if c is not None]
        if first_failure is not None:
            self.failure = f"{self._who(first_failure)} {describe_end(codes[first_failure])}"
            self._say(f"training failed: {self.failure}")
        return launcher_exit_code(codes, first_failure)

    def _who(self, rank: int) -> str:
        return f"training process {rank} of {self.num_processes} (pid {self.procs[rank].pid})"

    def run(self) -> int:
        """Start, supervise with the stop signals passed on, and return the exit code."""
        previous = {signum: signal.getsignal(signum) for signum in stop_signals()}
        for signum in previous:
            signal.signal(signum, self._forward_stop)
        try:
            self.start()
            return self.wait()
        finally:
            self.kill()
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def watch_parent(*, interval_s: float = 1.0, log: TextIO | None = None) -> threading.Thread:
    """In a worker: end this process when its launcher is gone (killed with -9, say), so no worker trains on
    unseen; a daemon thread that looks every `interval_s` seconds."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent or not psutil.pid_exists(parent):
                try:
                    print("the launcher of this training process is gone: ending it", file=log or sys.stderr)
                finally:
                    os._exit(1)

    thread = threading.Thread(target=watch, name="train-management-parent-watch", daemon=True)
    thread.start()
    return thread


def worker_command(argv: Sequence[str]) -> list[str]:
    """This interpreter running kohya_backend with `argv` (the train arguments without --num-processes)."""
    return [sys.executable, "-m", "kohya_backend", *argv]


def launch(argv: Sequence[str], num_processes: int, *, log: TextIO | None = None) -> int:
    """Run `python -m kohya_backend <argv>` in `num_processes` supervised processes; the run's exit code."""
    return Launch(worker_command(argv), num_processes, log=log).run()
