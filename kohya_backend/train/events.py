"""Progress leaves the trainer as JSON-lines events (and a human console line); callbacks never crash training."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from kohya_backend.job_folder import EVENT_KINDS as EVENT_RECORDS_KINDS
from kohya_backend.job_folder import StepEvent

EVENT_KINDS = EVENT_RECORDS_KINDS  # the job-folder contract's kinds (kohya_backend/job_folder.py)
CONSOLE_INTERVAL_S = 1.0


def _jsonable(value: Any) -> Any:
    """Plain JSON values: non-finite floats become None, paths and other objects their str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    return str(value)


def format_duration(seconds: float) -> str:
    """H:MM:SS for an ETA line."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class EpochLossAverage:
    """kohya's moving average: the mean of the latest loss at each batch position of an epoch."""

    def __init__(self) -> None:
        self._losses: list[float] = []
        self._total = 0.0
        self._epoch: int | None = None
        self._index = 0

    def add(self, epoch: int, loss: float) -> float:
        """Record one step's loss and return the current average."""
        if epoch != self._epoch:
            self._epoch, self._index = epoch, 0
        if self._index < len(self._losses):
            self._total -= self._losses[self._index]
            self._losses[self._index] = loss
        else:
            self._losses.append(loss)
        self._total += loss
        self._index += 1
        return self._total / len(self._losses)


class EventLog:
    """Writes events as JSON lines to `path` (flushed each line), prints progress, and feeds subscribers."""

    def __init__(
        self,
        path: Path | None,
        *,
        console: TextIO | None = sys.stderr,
        total_steps: int = 0,
        total_epochs: int = 0,
    ) -> None:
        self.path = path
        self.console = console
        self.total_steps = total_steps
        self.total_epochs = total_epochs
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[dict], None]] = []
        self._failed_subscribers: set[int] = set()
        self._average = EpochLossAverage()
        self._rate_start: tuple[int, float] | None = None
        self._last_console = 0.0
        self._file: TextIO | None = None
        if path is not None:
            self._file = self._open(path)

    @staticmethod
    def _open(path: Path) -> TextIO:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a", encoding="utf-8")
        if handle.tell() > 0:
            with path.open("rb") as existing:
                existing.seek(-1, 2)
                if existing.read(1) != b"\n":
                    handle.write("\n")  # a crashed writer left half a line: keep ours separate
        return handle

    def subscribe(self, callback: Callable[[dict], None]) -> None:
        """Call `callback(event)` for every later event; its exceptions are swallowed and reported once."""
        with self._lock:
            self._subscribers.append(callback)

    def emit(self, kind: str, **fields: Any) -> None:
        """Record one event {"t": unix time, "kind": kind, **fields}: file line, console line, subscribers."""
        event = {"t": round(time.time(), 3), "kind": kind, **{k: _jsonable(v) for k, v in fields.items()}}
        with self._lock:
            self._write(event)
            if kind != "step":
                self._print(self._console_text(event))
            self._notify(event)

    def step(
        self, *, step: int, epoch: int, loss: float, lrs: list[float], extra: dict[str, float] | None = None
    ) -> None:
        """Record a finished optimizer step with average loss, it/s and ETA (and `extra` numbers such as kohya's
        max-norm logs); print a progress line ~1/s."""
        now = time.monotonic()
        with self._lock:
            avg = self._average.add(epoch, float(loss))
            rate = self._rate(step, now)
            eta = (self.total_steps - step) / rate if rate and self.total_steps else None
            record: StepEvent = {
                "step": step,
                "epoch": epoch,
                "loss": float(loss),
                "avg_loss": avg,
                "lrs": [float(v) for v in lrs],
                "it_per_s": rate,
                "eta_s": eta,
                "total_steps": self.total_steps,
                "total_epochs": self.total_epochs,
            }
            self.emit("step", **record, **(extra or {}))  # extra: e.g. kohya's max-norm numbers
            is_last = self.total_steps > 0 and step >= self.total_steps
            if is_last or now - self._last_console >= CONSOLE_INTERVAL_S:
                self._last_console = now
                self._print(self._progress_line(step, epoch, float(loss), avg, lrs, rate, eta))

    def close(self) -> None:
        """Close the events file; later events still reach the console and subscribers."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rate(self, step: int, now: float) -> float | None:
        # The first step carries start-up costs (allocation, caching); it/s is measured from its end.
        if self._rate_start is None or step <= self._rate_start[0]:
            self._rate_start = (step, now)
            return None
        first_step, first_time = self._rate_start
        elapsed = now - first_time
        return (step - first_step) / elapsed if elapsed > 0 else None

    def _progress_line(
        self,
        step: int,
        epoch: int,
        loss: float,
        avg: float,
        lrs: list[float],
        rate: float | None,
        eta: float | None,
    ) -> str:
        steps = f"{step}/{self.total_steps}" if self.total_steps else str(step)
        epochs = f"{epoch}/{self.total_epochs}" if self.total_epochs else str(epoch)
        lr_text = "/".join(f"{v:.1e}" for v in lrs) or "-"
        speed = f"{rate:.2f} it/s" if rate else "- it/s"
        eta_text = format_duration(eta) if eta is not None else "-"
        return (
            f"step {steps} epoch {epochs} loss {loss:.4f} avg {avg:.4f} lr {lr_text} {speed} ETA {eta_text}"
        )

    @staticmethod
    def _console_text(event: dict) -> str:
        kind = event["kind"]
        if "message" in event:
            return f"[{kind}] {event['message']}"
        details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("t", "kind"))
        return f"[{kind}] {details}".rstrip()

    def _write(self, event: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(event, ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()

    def _print(self, text: str) -> None:
        if self.console is None:
            return
        try:
            print(text, file=self.console, flush=True)
        except (OSError, ValueError):
            self.console = None  # the console went away (closed pipe): keep training, keep the file

    def _notify(self, event: dict) -> None:
        first_failures: list[str] = []
        for callback in list(self._subscribers):
            try:
                callback(dict(event))
            except Exception as exc:
                if id(callback) not in self._failed_subscribers:
                    self._failed_subscribers.add(id(callback))
                    first_failures.append(f"progress callback {callback!r} failed and is ignored: {exc!r}")
        # Reported after every subscriber has seen this event, so they all see events in the same order.
        for message in first_failures:
            self.emit("warning", message=message)


def read_events(path: Path, *, after_line: int = 0) -> list[dict]:
    """Events from line `after_line` on; a half-written last line is left for the next read.

    A complete line that is not JSON (a crashed writer's fragment) comes back as {"kind": "unreadable", ...}
    so that `after_line + len(result)` always points at the next unread line.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")[:-1]  # the part after the last newline is not finished yet
    events: list[dict] = []
    for raw in lines[after_line:]:
        text = raw.decode("utf-8", errors="replace").strip()
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            event = {"kind": "unreadable", "text": text[:200]}
        events.append(event)
    return events
