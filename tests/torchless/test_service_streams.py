"""The log tails the API and the scheduler show: the last lines, read backwards from the end of a long log."""

from __future__ import annotations

from pathlib import Path

from kohya_backend.jobs import progress
from kohya_backend.jobs.runner import LOG_NAME
from kohya_backend.service import streams


def test_tail_lines_reads_only_the_end(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i} {'x' * (i % 50)}\n" for i in range(5000)) + "last\r\n")
    monkeypatch.setattr(progress, "_TAIL_BLOCK", 1000)  # many blocks: lines cut at block starts
    assert streams.tail_lines(log, 3).splitlines() == [
        "line 4998 " + "x" * 48,
        "line 4999 " + "x" * 49,
        "last",
    ]
    whole = streams.tail_lines(log, 10_000).splitlines()
    assert len(whole) == 5001 and whole[0] == "line 0 "
    assert streams.tail_lines(tmp_path / "missing.log", 5) == ""
    (tmp_path / "empty.log").write_text("")
    assert streams.tail_lines(tmp_path / "empty.log", 5) == ""


def test_log_tail_finds_its_lines_behind_long_lines_and_blank_ones(tmp_path: Path, monkeypatch) -> None:
    long_lines = [f"{i:02d} " + "x" * 2000 for i in range(30)]  # a traceback with long lines: 60 KB
    (tmp_path / LOG_NAME).write_text("\n".join(long_lines) + "\n" + "\r\n \n" * 20_000)
    assert progress.log_tail(tmp_path, 20).split("\n") == long_lines[-20:]
    assert progress.log_tail(tmp_path, 0) == "" and progress.log_tail(tmp_path / "missing", 5) == ""
    monkeypatch.setattr(progress, "MAX_READ_BYTES", 4096)  # a log of blank lines is not read whole
    assert progress.log_tail(tmp_path, 20) == ""
