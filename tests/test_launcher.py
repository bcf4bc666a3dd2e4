"""The data-parallel launcher: each process's place from the environment, the workers' environment, the loopback
rendezvous, and supervision (a failed worker ends the run, stop signals reach every worker once) with stand-in
workers, small Python programs that start in milliseconds. Training in several processes: test_train_distributed.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from kohya_backend import launcher
from kohya_backend.errors import TrainManagementError
from kohya_backend.launcher import Launch, launcher_exit_code, worker_env
from kohya_backend.train.process_env import LAUNCHED_ENV, STORE_FD_ENV, ProcessInfo, process_info

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and descriptor passing")


def test_process_info_reads_what_launchers_set() -> None:
    assert process_info({}) == ProcessInfo(0, 1, 0) and not process_info({}).distributed
    info = process_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.distributed) == (
        3,
        4,
        1,
        False,
        True,
    )
    assert process_info({"RANK": "1", "WORLD_SIZE": "2"}).local_rank == 1  # LOCAL_RANK defaults to RANK


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2, LOCAL_RANK=2, WORLD_SIZE=2 do not describe"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ],
)
def test_process_info_refuses_a_place_that_is_not_one(env: dict[str, str], message: str) -> None:
    with pytest.raises(TrainManagementError, match=message) as caught:
        process_info(env)
    assert caught.value.hint


def test_worker_env_places_each_worker_on_the_loopback_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "loopback_interface", lambda: "lo")
    base = {"PATH": "/bin", STORE_FD_ENV: "99", "WORLD_SIZE": "7"}
    first = worker_env(base, rank=0, world_size=2, port=4321, store_fd=5, cpu_count=16)
    second = worker_env(base, rank=1, world_size=2, port=4321, store_fd=None, cpu_count=16)
    for rank, env in enumerate((first, second)):
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == (str(rank), str(rank), "2")
        assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["PATH"]) == ("127.0.0.1", "4321", "/bin")
        assert env["OMP_NUM_THREADS"] == "8"  # an even share of the cores, not all of them each
        assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "lo"
    assert first[STORE_FD_ENV] == "5" and STORE_FD_ENV not in second  # only rank 0 serves the rendezvous
    if os.name == "posix":
        assert first[LAUNCHED_ENV] == second[LAUNCHED_ENV] == "1"
    # What the user set stays: their thread count and network interface.
    mine = worker_env(
        {"OMP_NUM_THREADS": "3", "GLOO_SOCKET_IFNAME": "eth1"}, rank=0, world_size=4, port=1, store_fd=None
    )
    assert (mine["OMP_NUM_THREADS"], mine["GLOO_SOCKET_IFNAME"], mine["NCCL_SOCKET_IFNAME"]) == (
        "3",
        "eth1",
        "lo",
    )


def test_loopback_interface_is_found_here() -> None:
    name = launcher.loopback_interface()
    assert name is not None
    addresses = psutil.net_if_addrs()[name]
    assert any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses)


@pytest.mark.parametrize(
    ("codes", "first", "expected"),
    [
        ([0, 0], None, 0),  # done
        ([3, 3], None, 3),  # a cancel: every process stopped with its state saved
        ([0, 3], None, 3),  # rank 0 stopped, a finished peer
        ([2, 2], 0, 2),  # a config error every process found: the user's to fix
        ([1, 2], 1, 2),  # one process's own error (exit 2) is the cause, rank 0 only lost its peer
        ([1, -9], 1, 1),  # a process was killed: a crash
        ([2, -9], 1, 2),  # rank 0 told what went wrong (its result.json says it)
    ],
)
def test_launcher_exit_code(codes: list[int], first: int | None, expected: int) -> None:
    assert launcher_exit_code(codes, first) == expected


_WORKER = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    rank = int(os.environ["RANK"])
    out = sys.argv[1]
    fd = os.environ.get("TRAIN_MANAGEMENT_STORE_FD")
    if fd is not None:  # rank 0 was handed the rendezvous socket: where does it listen?
        sock = socket.socket(fileno=int(fd))
        host, port = sock.getsockname()
        open(f"{out}/store", "w").write(f"{host} {port} {os.environ['MASTER_PORT']}")
    signals = []
    signal.signal(signal.SIGTERM, lambda s, f: signals.append(s))
    open(f"{out}/ready-{rank}", "w").write(str(os.getpid()))
    mode = os.environ.get("MODE", "sleep")
    if mode == "fail" and rank == 1:
        sys.exit(2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not signals:
        time.sleep(0.02)
    if signals:
        time.sleep(0.3)  # "saving"; a repeated SIGTERM meanwhile is counted, not fatal
        open(f"{out}/stopped-{rank}", "w").write(str(len(signals)))
        sys.exit(3)
    sys.exit(0)
    """
)


def _wait_for(path_glob: str, folder: Path, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(path_glob))) < count:
        assert time.monotonic() < deadline, f"only {list(folder.glob(path_glob))}"
        time.sleep(0.02)


@posix_only
def test_a_failed_worker_ends_the_run_and_no_worker_outlives_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODE", "fail")
    monkeypatch.setattr(
        launcher, "FAILURE_GRACE_S", 0.5
    )  # rank 0 would sleep 30 s: it is ended after the grace
    script = tmp_path / "worker.py"
    script.write_text(_WORKER, encoding="utf-8")
    log = io.StringIO()
    run = Launch([sys.executable, str(script), str(tmp_path)], 2, log=log)
    started = time.monotonic()
    assert run.run() == 2  # the failing worker's own exit code 2: its error is the user's to fix
    assert time.monotonic() - started < 15
    assert run.codes[1] == 2 and run.codes[0] == -signal.SIGKILL
    assert not any(psutil.pid_exists(p.pid) and psutil.Process(p.pid).status() != "zombie" for p in run.procs)
    text = log.getvalue()
    assert f"training process 1 of 2 (pid {run.procs[1].pid}) exited with code 2; the others stop too" in text
    assert "did not end by themselves: ending them" in text
    assert run.failure == f"training process 1 of 2 (pid {run.procs[1].pid}) exited with code 2"
    # The rendezvous listened on the loopback only, on the port the workers were told, and is free again.
    host, port, told = (tmp_path / "store").read_text(encoding="utf-8").split()
    assert host == "127.0.0.1" and port == told == str(run.port)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", run.port))  # nothing listens there any more


@posix_only
def test_a_stop_signal_reaches_every_worker_and_a_second_one_ends_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODE", "sleep")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER, encoding="utf-8")
    run = Launch([sys.executable, str(script), str(tmp_path)], 3, log=io.StringIO())

    def stop_when_ready() -> None:
        _wait_for("ready-*", tmp_path, 3)
        os.kill(
            os.getpid(), signal.SIGTERM
        )  # as the job's cancel does to the launcher (its group: the workers too)

    helper = threading.Thread(target=stop_when_ready)
    helper.start()
    assert run.run() == 3  # every worker stopped (exit 3): the run was stopped, not failed
    helper.join()
    assert sorted(p.name for p in tmp_path.glob("stopped-*")) == ["stopped-0", "stopped-1", "stopped-2"]
    assert signal.getsignal(signal.SIGTERM) is not run._forward_stop  # the launcher's handler is gone again

    for old in tmp_path.glob("*-*"):
        old.unlink()
    twice = Launch([sys.executable, str(script), str(tmp_path)], 2, log=io.StringIO())

    def stop_twice() -> None:
        _wait_for("ready-*", tmp_path, 2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # asked again before they finished "saving": end them now

    helper = threading.Thread(target=stop_twice)
    helper.start()
    assert twice.run() == 1
    helper.join()
    assert twice.codes == [-signal.SIGKILL, -signal.SIGKILL] and not list(tmp_path.glob("stopped-*"))


def test_num_processes_is_a_count_and_not_combined_with_another_launcher(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kohya_backend.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--config", "x.toml", "--num-processes", "0"])
    assert "'0' is not a number of processes (1 or more)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--config", "x.toml", "--num-processes", "2"]) == 2
    err = capsys.readouterr().err
    assert "[training process 1] error: this process is already one of several training processes" in err
    assert "accelerate launch" in err


def test_a_data_parallel_worker_takes_a_repeated_stop_as_the_same_stop() -> None:
    """Its launcher passes a stop on to every worker, which may have had it already from the process group: the
    repeat must not end the worker before rank 0 saved. Alone, a second Ctrl-C still stops at once."""
    from kohya_backend.cli import _install_stop_handler

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = _install_stop_handler(repeat_forces=False)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # no KeyboardInterrupt
        assert stop.is_set()
        alone = _install_stop_handler()
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert alone.is_set()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
