"""Trainer processes the same way on POSIX and Windows: start detached, identify, ask to stop, end the tree.

POSIX: the trainer leads a new session (its own process group); a graceful stop is SIGTERM to that group and a
forced one SIGKILL. Windows has no process groups to signal: the trainer starts in a new console process group
(CREATE_NEW_PROCESS_GROUP), a graceful stop is CTRL_BREAK_EVENT to that group (Python raises SIGBREAK in the
trainer, which treats it as SIGTERM), and a forced stop terminates the whole process tree through psutil.
A process is always identified by its pid plus its start time (psutil's create_time), so a pid the system reused
for another program is never signalled. Every function takes `windows` (None: this system, WINDOWS) so both
branches are testable anywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

WINDOWS = os.name == "nt"
# Windows' values, spelled out so the Windows branch can be exercised (with fakes) on any system.
CREATE_NEW_PROCESS_GROUP: int = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CTRL_BREAK_EVENT: int = getattr(signal, "CTRL_BREAK_EVENT", 1)
# psutil derives create_time from boot time + start ticks (1/100 s on Linux); two readings of one process agree
# far more closely than this, while a recycled pid would have to start within it to pass for the original.
CREATE_TIME_TOLERANCE_S = 0.5


def _windows(windows: bool | None) -> bool:
    return WINDOWS if windows is None else windows


def stop_signals() -> list[signal.Signals]:
    """The signals that ask a trainer to stop gracefully here: SIGTERM, SIGINT and, on Windows, SIGBREAK."""
    found = [signal.SIGTERM, signal.SIGINT]
    sigbreak = getattr(signal, "SIGBREAK", None)  # what CTRL_BREAK_EVENT raises in a Windows process
    if sigbreak is not None and sigbreak not in found:
        found.append(sigbreak)
    return found


def popen_options(*, windows: bool | None = None) -> dict[str, Any]:
    """Popen keywords that detach a child into a group of its own (so stopping it reaches its whole tree)."""
    if _windows(windows):
        return {"creationflags": CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def spawn(
    command: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    stdout: IO[bytes],
    windows: bool | None = None,
) -> subprocess.Popen[bytes]:
    """Start `command` detached in its own group, stdin closed, stdout and stderr into `stdout`."""
    return subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=dict(env),
        close_fds=True,
        **popen_options(windows=windows),
    )


def create_time(pid: int) -> float:
    """When process `pid` started (seconds since the epoch); psutil.NoSuchProcess when there is none."""
    return float(psutil.Process(pid).create_time())


def find(pid: int, started: float) -> psutil.Process | None:
    """The live (or zombie) process `pid` if it is the one that started at `started`, else None."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) > CREATE_TIME_TOLERANCE_S:
            return None  # the pid was reused by another process
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return proc


def is_zombie(proc: psutil.Process) -> bool:
    """Whether `proc` has exited (a zombie, or gone) and only its exit status waits to be collected."""
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def reap(pid: int, *, windows: bool | None = None) -> tuple[bool, int | None] | None:
    """Collect the exit status of our child `pid` without waiting: (alive, exit code when it ended).

    None when the process is not this process's child (the host was restarted: its exit status went to its new
    parent), and always None on Windows, where exit codes come from the Popen that started the child.
    """
    if _windows(windows):
        return None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if done == 0:
        return True, None
    return False, os.waitstatus_to_exitcode(status)


def request_stop(pid: int, group: int, *, windows: bool | None = None) -> bool:
    """Ask the trainer (`pid`, leading process group `group`) to stop gracefully; False when it is gone.

    Windows: CTRL_BREAK_EVENT to its process group, which reaches it only when it shares this process's console
    (children started by spawn() do); without a console the forced stop after the grace period ends it.
    """
    try:
        if _windows(windows):
            os.kill(group, CTRL_BREAK_EVENT)
        else:
            os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except OSError:
        if not _windows(windows):
            raise
        return psutil.pid_exists(pid)  # no console to send the event through: the escalation ends it
    return True


def kill_tree(pid: int, group: int, *, windows: bool | None = None) -> bool:
    """End the trainer and everything it started, now; False when there was nothing left to end.

    POSIX: SIGKILL to its process group. Windows: terminate its descendants, then the trainer itself (children
    first, so none is left orphaned and running between the two).
    """
    if not _windows(windows):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return False
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return True
