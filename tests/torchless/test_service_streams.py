"""The log tail the API serves: the last lines, read backwards from the end of a long log."""

from __future__ import annotations

from pathlib import Path

from kohya_backend.service import streams


def test_tail_lines_reads_only_the_end(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i} {'x' * (i % 50)}\n" for i in range(5000)) + "last\r\n")
    monkeypatch.setattr(streams, "_TAIL_BLOCK", 1000)  # many blocks: lines cut at block starts
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
