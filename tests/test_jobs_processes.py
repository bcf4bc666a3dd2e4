"""The portable process layer: its POSIX branch for real (children, groups, signals), its Windows branch with the
platform injected and psutil/Popen/os.kill replaced by recorders, since only Windows can run that for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from kohya_backend import cli
from kohya_backend.jobs import processes
from kohya_backend.jobs.runner import RUN_NAME, LocalRunner
from kohya_backend.jobs.store import JobStore

posix_only = pytest.mark.skipif(os.name != "posix", reason="runs the POSIX branch for real")

# A parent that starts a grandchild in its own group, reports both pids, and ignores SIGTERM on request.
_FAMILY = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(os.getpid(), child.pid, flush=True)
time.sleep(120)
"""


def _spawn_family(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], int]:
    out = tmp_path / f"family-{mode}.txt"
    with open(out, "wb") as handle:
        popen = processes.spawn(
            [sys.executable, "-c", _FAMILY, mode], cwd=tmp_path, env=os.environ, stdout=handle
        )
    deadline = time.monotonic() + 30
    while len(out.read_text().split()) < 2:
        assert time.monotonic() < deadline, "the test family never started"
        time.sleep(0.02)
    parent, child = map(int, out.read_text().split())
    assert parent == popen.pid
    return popen, child


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


@posix_only
def test_a_spawned_trainer_leads_its_own_group_and_a_graceful_stop_reaches_it(tmp_path: Path) -> None:
    popen, child = _spawn_family(tmp_path, "obey")
    try:
        assert os.getpgid(popen.pid) == popen.pid != os.getpgid(0)  # its own group, not ours
        assert os.getpgid(child) == popen.pid  # its children follow it into that group
        assert processes.reap(popen.pid) == (True, None)
        assert processes.request_stop(popen.pid, popen.pid)
        assert popen.wait(timeout=10) == -signal.SIGTERM
        assert _gone(child)
    finally:
        processes.kill_tree(popen.pid, popen.pid)


@posix_only
def test_kill_tree_ends_a_trainer_that_ignores_the_stop_with_all_it_started(tmp_path: Path) -> None:
    popen, child = _spawn_family(tmp_path, "ignore")
    assert processes.request_stop(popen.pid, popen.pid)
    time.sleep(0.3)
    assert popen.poll() is None  # it ignored the graceful stop
    assert processes.kill_tree(popen.pid, popen.pid)
    assert popen.wait(timeout=10) == -signal.SIGKILL
    assert _gone(child)


@posix_only
def test_a_process_is_known_by_its_start_time_never_by_its_pid_alone(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = processes.create_time(sleeper.pid)
        assert processes.find(sleeper.pid, started) is not None
        # the same pid with another start time is a different (recycled) process: never ours
        assert processes.find(sleeper.pid, started - 2 * processes.CREATE_TIME_TOLERANCE_S) is None
        assert processes.find(sleeper.pid, started + 2 * processes.CREATE_TIME_TOLERANCE_S) is None
        proc = processes.find(sleeper.pid, started)
        assert proc is not None and not processes.is_zombie(proc)
        sleeper.kill()
        deadline = time.monotonic() + 10
        while not processes.is_zombie(proc):  # exited, not yet collected: still found, as a zombie
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert processes.find(sleeper.pid, started) is not None
        assert processes.reap(sleeper.pid) == (False, -signal.SIGKILL)
        assert processes.find(sleeper.pid, started) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert processes.reap(os.getppid()) is None  # not our child: its exit status is not ours to collect


# -- the Windows branch, with the platform injected ------------------------------------------------------------


class _FakeProc:
    """psutil.Process for the Windows branch: a tree of fakes that records kill() calls."""

    def __init__(self, pid: int, log: list[int], children: list[_FakeProc] | None = None) -> None:
        self.pid, self.log, self._children = pid, log, children or []

    def children(self, recursive: bool = False) -> list[_FakeProc]:
        assert recursive  # the whole tree, grandchildren included
        found: list[_FakeProc] = []
        for child in self._children:
            found += [child, *child.children(recursive=True)]
        return found

    def kill(self) -> None:
        if self.pid == 13:
            raise psutil.NoSuchProcess(13)  # exited meanwhile: not an error
        self.log.append(self.pid)


def test_windows_starts_the_trainer_in_a_new_process_group() -> None:
    assert processes.popen_options(windows=True) == {"creationflags": processes.CREATE_NEW_PROCESS_GROUP}
    assert processes.CREATE_NEW_PROCESS_GROUP == 0x00000200  # Windows' value, also where subprocess lacks it
    assert processes.popen_options(windows=False) == {"start_new_session": True}


def test_windows_spawn_passes_the_group_flag_to_popen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_popen(command: list[str], **kwargs: Any) -> str:
        seen.update(kwargs, command=command)
        return "popen"

    monkeypatch.setattr(processes.subprocess, "Popen", fake_popen)
    with open(tmp_path / "log", "wb") as log:
        assert (
            processes.spawn(["py", "-m", "x"], cwd=tmp_path, env={"A": "1"}, stdout=log, windows=True)
            == "popen"
        )
    assert seen["creationflags"] == processes.CREATE_NEW_PROCESS_GROUP and "start_new_session" not in seen
    assert (
        seen["stdin"] is subprocess.DEVNULL
        and seen["stderr"] is subprocess.STDOUT
        and seen["env"] == {"A": "1"}
    )


def test_windows_graceful_stop_is_ctrl_break_to_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(processes.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    assert processes.request_stop(4242, 4242, windows=True)
    assert sent == [(4242, processes.CTRL_BREAK_EVENT)] and processes.CTRL_BREAK_EVENT == 1

    def gone(pid: int, sig: int) -> None:
        raise ProcessLookupError(pid)

    monkeypatch.setattr(processes.os, "kill", gone)
    assert not processes.request_stop(4242, 4242, windows=True)

    def no_console(pid: int, sig: int) -> None:
        raise OSError(6, "The handle is invalid")  # the host has no console to send the event through

    monkeypatch.setattr(processes.os, "kill", no_console)
    monkeypatch.setattr(processes.psutil, "pid_exists", lambda pid: pid == 4242)
    assert processes.request_stop(4242, 4242, windows=True)  # still running: the forced stop comes later
    assert not processes.request_stop(77, 77, windows=True)


def test_windows_kill_terminates_the_whole_tree_children_first(monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[int] = []
    tree = _FakeProc(10, killed, [_FakeProc(11, killed, [_FakeProc(12, killed)]), _FakeProc(13, killed)])
    monkeypatch.setattr(processes.psutil, "Process", lambda pid: tree if pid == 10 else _missing(pid))
    assert processes.kill_tree(10, 10, windows=True)
    assert killed == [11, 12, 10]  # the trainer last; a child that exited meanwhile (13) is no error
    assert not processes.kill_tree(99, 99, windows=True)
    assert processes.reap(10, windows=True) is None  # exit codes come from the Popen on Windows


def _missing(pid: int) -> None:
    raise psutil.NoSuchProcess(pid)


def test_the_trainer_treats_windows_ctrl_break_as_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    assert processes.stop_signals()[:2] == [signal.SIGTERM, signal.SIGINT]
    if not hasattr(signal, "SIGBREAK"):
        # stand in a real POSIX signal for SIGBREAK, which exists only on Windows
        monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    assert processes.stop_signals()[-1] == signal.SIGBREAK
    before = {s: signal.getsignal(s) for s in processes.stop_signals()}
    try:
        stop = cli._install_stop_handler()
        assert not stop.is_set()
        signal.raise_signal(signal.SIGBREAK)
        assert stop.is_set()  # a graceful stop: the loop saves and ends at the next step
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGBREAK)  # a second one stops at once, as a second SIGTERM does
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@posix_only
def test_the_local_runner_on_windows_breaks_then_terminates_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LocalRunner through the Windows branch: CREATE_NEW_PROCESS_GROUP, CTRL_BREAK, the tree after the grace."""
    monkeypatch.setattr(processes, "WINDOWS", True)
    flags: list[int] = []
    breaks: list[tuple[int, int]] = []
    real_popen = subprocess.Popen

    def popen(command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        flags.append(kwargs.pop("creationflags"))
        # a stand-in trainer that, like one without a console, never sees the break
        return real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs)

    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if sig == processes.CTRL_BREAK_EVENT:
            breaks.append((pid, sig))  # on POSIX the same number is SIGHUP: record it instead
        else:
            real_kill(pid, sig)  # psutil's kill() on POSIX comes through here

    monkeypatch.setattr(processes.subprocess, "Popen", popen)
    monkeypatch.setattr(processes.os, "kill", kill)
    job = JobStore(tmp_path / "home").create(
        fm_type="sd_1_5",
        model="m",
        dataset="d",
        instance_type="local",
        output_name="w",
        config_toml="",
        params={},
    )
    runner = LocalRunner()
    handle = runner.start(job, resume=False, device="cpu")
    assert flags == [processes.CREATE_NEW_PROCESS_GROUP]
    assert json.loads((job.folder / RUN_NAME).read_text())["pid"] == handle.pid
    assert runner.poll(handle).alive
    runner.cancel(handle, grace_s=0.2)
    assert breaks == [(handle.pgid, processes.CTRL_BREAK_EVENT)]
    deadline = time.monotonic() + 10
    while (status := runner.poll(handle)).alive:
        assert time.monotonic() < deadline, "the tree was not terminated after the grace period"
        time.sleep(0.02)
    assert status.exit_code == -signal.SIGKILL  # psutil's kill; Windows reports TerminateProcess's code
