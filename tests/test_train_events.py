"""Events: JSON lines that parse, a human progress line, kohya's average loss, callbacks that cannot crash."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from kohya_backend.train import events as events_module
from kohya_backend.train.events import EpochLossAverage, EventLog, format_duration, read_events

PROGRESS = re.compile(
    r"^step (\d+)/(\d+) epoch (\d+)/(\d+) loss (\d+\.\d{4}) avg (\d+\.\d{4}) lr (\S+) (\S+) it/s ETA (\S+)$"
)


def test_every_event_is_one_json_line_with_time_and_kind(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    console = io.StringIO()
    with EventLog(path, console=console, total_steps=3, total_epochs=1) as log:
        log.emit("start", fm_type="sd_1_5", output=tmp_path / "out")
        log.step(step=1, epoch=1, loss=0.5, lrs=[1e-4, 1e-5])
        log.emit("warning", message="low disk", bad=float("nan"))
        log.emit("done", step=1)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["kind"] for r in records] == ["start", "step", "warning", "done"]
    assert all(isinstance(r["t"], float) for r in records)
    assert records[0]["output"] == str(tmp_path / "out")
    assert records[1]["lrs"] == [1e-4, 1e-5] and records[1]["avg_loss"] == 0.5
    assert records[1]["total_steps"] == 3
    assert records[2]["bad"] is None  # NaN is not JSON: written as null
    text = console.getvalue()
    assert "[warning] low disk" in text
    assert "[done] step=1" in text


def test_console_progress_line_format_and_values(tmp_path: Path) -> None:
    console = io.StringIO()
    log = EventLog(None, console=console, total_steps=40, total_epochs=4)
    log.step(step=12, epoch=1, loss=0.1234, lrs=[1e-4])
    line = console.getvalue().strip().splitlines()[-1]
    match = PROGRESS.match(line)
    assert match, line
    assert match.group(1, 2, 3, 4) == ("12", "40", "1", "4")
    assert match.group(5) == "0.1234" and match.group(7) == "1.0e-04"
    assert match.group(8) == "-" and match.group(9) == "-"  # no rate yet after the first step


def test_rate_eta_and_console_throttling(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(events_module.time, "monotonic", lambda: clock[0])
    console = io.StringIO()
    seen: list[dict] = []
    log = EventLog(None, console=console, total_steps=10, total_epochs=1)
    log.subscribe(seen.append)
    for step in range(1, 11):
        log.step(step=step, epoch=1, loss=1.0, lrs=[1e-3])
        clock[0] += 0.25  # 4 it/s: four steps per console interval
    progress = [line for line in console.getvalue().splitlines() if line.startswith("step ")]
    assert len(progress) == 4  # steps 1, 5, 9 by the 1 s throttle, plus the last step always
    assert progress[-1].startswith("step 10/10")
    last = seen[-1]
    assert last["it_per_s"] == pytest.approx(4.0)
    assert last["eta_s"] == pytest.approx(0.0)
    assert seen[5]["eta_s"] == pytest.approx((10 - 6) / 4.0)
    assert PROGRESS.match(progress[1]).group(8) == "4.00"  # type: ignore[union-attr]


def test_average_loss_is_kohyas_epoch_window() -> None:
    avg = EpochLossAverage()
    assert [avg.add(1, v) for v in (1.0, 2.0, 3.0)] == [1.0, 1.5, 2.0]
    # the next epoch replaces the loss at the same batch position
    assert avg.add(2, 5.0) == pytest.approx((5.0 + 2.0 + 3.0) / 3)
    assert avg.add(2, 8.0) == pytest.approx((5.0 + 8.0 + 3.0) / 3)


def test_a_raising_subscriber_never_breaks_emit(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    console = io.StringIO()
    log = EventLog(path, console=console)
    calls = {"bad": 0}
    good: list[str] = []

    def bad(event: dict) -> None:
        calls["bad"] += 1
        raise RuntimeError("subscriber exploded")

    log.subscribe(bad)
    log.subscribe(lambda e: good.append(e["kind"]))
    log.emit("log", message="one")
    log.step(step=1, epoch=1, loss=0.1, lrs=[])
    log.emit("log", message="two")
    log.close()
    kinds = [e["kind"] for e in read_events(path)]
    assert kinds.count("warning") == 1  # reported once, not per event
    assert kinds == ["log", "warning", "step", "log"]
    assert good == ["log", "warning", "step", "log"]
    assert calls["bad"] >= 3
    assert "subscriber exploded" in console.getvalue()


def test_subscribers_receive_a_copy(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "e.jsonl", console=None)
    log.subscribe(lambda e: e.update(kind="tampered"))
    log.emit("log", message="x")
    log.close()
    assert read_events(tmp_path / "e.jsonl")[0]["kind"] == "log"


def test_read_events_tolerates_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"t": 1, "kind": "start"}\n{"t": 2, "kind": "step", "step": 1}\n{"t": 3, "ki', encoding="utf-8"
    )
    assert [e["kind"] for e in read_events(path)] == ["start", "step"]
    assert [e["kind"] for e in read_events(path, after_line=1)] == ["step"]
    assert read_events(path, after_line=2) == []
    assert read_events(tmp_path / "missing.jsonl") == []
    # a new writer finishes the fragment with a newline and continues on its own line
    with EventLog(path, console=None) as log:
        log.emit("log", message="resumed")
    events = read_events(path)
    assert [e["kind"] for e in events] == ["start", "step", "unreadable", "log"]
    assert read_events(path, after_line=3)[0]["message"] == "resumed"


def test_format_duration() -> None:
    assert format_duration(12) == "0:00:12"
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(-5) == "0:00:00"
