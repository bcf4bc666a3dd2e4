"""What a job's files say about its progress: its trainer's events (read incrementally), its log's last lines,
and whether a saved training state exists to resume from.

The scheduler folds events into the job's progress with `summarize`; the API and the tab follow events with
`EventTail` without re-reading a file from its start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kohya_backend.job_folder import LOG_NAME, JobFolder

MAX_READ_BYTES = 8 << 20
LOG_TAIL_LINES = 20
_TAIL_BLOCK = 64 << 10
MAX_WARNINGS = 20


def _parse_line(raw: bytes) -> dict[str, Any]:
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        event = json.loads(text)
    except ValueError:
        event = None
    return event if isinstance(event, dict) else {"kind": "unreadable", "text": text[:200]}


def _skip_lines(path: Path, lines: int) -> int:
    """The byte position just after the first `lines` complete lines of `path` (or of all it has)."""
    position = 0
    if lines <= 0:
        return 0
    with open(path, "rb") as handle:
        while lines > 0:
            block = handle.read(1 << 20)
            if not block:
                break
            start = 0
            while lines > 0:
                newline = block.find(b"\n", start)
                if newline < 0:
                    break
                lines -= 1
                start = newline + 1
            position += start if lines == 0 else len(block)
    return position


class EventTail:
    """Reads each job's events.jsonl from where it stopped last time (byte positions kept in memory).

    The store keeps the count of ingested lines, so after a restart the first read skips that many lines
    once; a half-written last line stays for the next read.
    """

    def __init__(self) -> None:
        self._positions: dict[str, tuple[int, int]] = {}

    def read(self, job_id: str, path: Path, lines_done: int) -> tuple[list[dict[str, Any]], int]:
        """New complete events after line `lines_done`, and the line count to record once they are applied."""
        try:
            cached = self._positions.get(job_id)
            start = cached[1] if cached and cached[0] == lines_done else _skip_lines(path, lines_done)
            with open(path, "rb") as handle:
                handle.seek(start)
                data = handle.read(MAX_READ_BYTES)
        except FileNotFoundError:
            return [], lines_done
        end = data.rfind(b"\n")
        if end < 0:
            return [], lines_done
        events = [_parse_line(raw) for raw in data[:end].split(b"\n")]
        done = lines_done + len(events)
        self._positions[job_id] = (done, start + end + 1)
        return events, done

    def forget(self, job_id: str) -> None:
        """Drop the cached position of a job that no longer runs."""
        self._positions.pop(job_id, None)


@dataclass
class EventSummary:
    """What a batch of events means for a job: progress to merge, outputs to record, state changes seen."""

    progress: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    stepped: bool = False
    final_saved: bool = False


def _step_progress(event: dict[str, Any]) -> dict[str, Any]:
    lrs = event.get("lrs")
    lr = lrs[0] if isinstance(lrs, list) and lrs else event.get("lr")
    out: dict[str, Any] = {
        "step": event.get("step"),
        "epoch": event.get("epoch"),
        "loss": event.get("loss"),
        "avg_loss": event.get("avg_loss"),
        "lr": lr,
        "it_per_s": event.get("it_per_s", event.get("it_s")),  # it_s: older trainers (and workers)
        "eta_s": event.get("eta_s"),
        "phase": "training",
    }
    if isinstance(lrs, list):
        out["lrs"] = lrs
    for key in ("total_steps", "total_epochs"):
        if event.get(key):
            out[key] = event[key]
    return out


_UPLOAD_KEYS = ("worker", "done", "total", "sent", "skipped", "files")
_PLAN_KEYS = (
    "total_steps",
    "steps_per_epoch",
    "epochs",
    "batches_per_epoch",
    "num_train_images",
    "batch_size",
)


_S3_KINDS = ("download", "downloaded", "s3_upload", "s3_uploaded")


def _s3_progress(kind: str, event: dict[str, Any], progress: dict[str, Any]) -> None:
    from kohya_backend.jobs.s3_jobs import human_bytes

    done, total = event.get("done"), event.get("total")
    sizes = human_bytes(int(done), int(total)) if isinstance(done, int) and isinstance(total, int) else ""
    if kind == "download":
        progress.update(
            phase=f"downloading {event.get('what')} {sizes}".strip(),
            download={k: event.get(k) for k in ("what", "uri", "done", "total")},
        )
    elif kind == "downloaded":
        progress.update(phase="starting", download={k: event.get(k) for k in ("total", "fetched")})
    elif kind == "s3_upload":
        progress.update(
            phase=f"uploading to S3 {sizes}".strip(),
            s3_upload={"uri": event.get("uri"), "done": done, "total": total},
        )
    else:
        progress["s3_outputs"] = event.get("uris")


def _cloud_progress(event: dict[str, Any], summary: EventSummary) -> None:
    """A cloud status: its fields under progress['cloud'], its phase shown; `state` training or saving moves the
    job on like a first step or the final save would."""
    summary.progress["cloud"] = {k: v for k, v in event.items() if k not in ("kind", "time", "t", "state")}
    if event.get("phase"):
        summary.progress["phase"] = event["phase"]
    if event.get("state") in ("training", "saving"):
        summary.stepped = True
    if event.get("state") == "saving":
        summary.final_saved = True


def summarize(events: list[dict[str, Any]], warnings: list[str]) -> EventSummary:
    """Fold trainer events (oldest first) into progress fields; `warnings` are the job's earlier ones."""
    summary = EventSummary()
    progress = summary.progress
    warnings = list(warnings)
    for event in events:
        kind = event.get("kind")
        if kind == "step":
            progress.update(_step_progress(event))
            summary.stepped = True
        elif kind == "plan":
            progress.update({k: event[k] for k in _PLAN_KEYS if k in event})
            if "epochs" in event:
                progress["total_epochs"] = event["epochs"]
        elif kind == "start":
            progress.update(phase="loading", device=event.get("device"))
        elif kind == "upload":  # a remote runner sending the job's files to its worker
            progress.update(phase="uploading", upload={k: event.get(k) for k in _UPLOAD_KEYS})
        elif kind in _S3_KINDS:  # S3 inputs downloaded before the trainer starts, its LoRA uploaded after it
            _s3_progress(kind, event, progress)
        elif kind == "cloud":  # a cloud runner's view of its job (SageMaker: statuses, training job, billing)
            _cloud_progress(event, summary)
        elif kind == "submitted":
            progress.update(phase="submitted", worker=event.get("worker"), remote_job=event.get("job"))
        elif kind == "caching":
            progress.update(phase="caching", caching={k: event.get(k) for k in ("what", "done", "total")})
        elif kind == "weights":  # fp16 frozen weights upcast once or kept (models/upcast.py)
            progress["frozen_weights"] = {k: event.get(k) for k in ("choice", "message")}
        elif kind == "epoch":
            progress["epoch"] = event.get("epoch")
        elif kind == "saved" and isinstance(event.get("path"), str):
            summary.outputs.append(event["path"])
            progress["last_saved"] = event["path"]
            if event.get("final"):
                progress["phase"] = "saving"
                summary.final_saved = True
        elif kind == "sample" and isinstance(event.get("path"), str):
            summary.outputs.append(event["path"])
            progress["last_sample"] = event["path"]
        elif kind == "grid" and isinstance(event.get("path"), str):  # the epoch comparison grid
            summary.outputs.append(event["path"])
            progress["grid"] = event["path"]
        elif kind == "state_saved":
            progress["state"] = event.get("path")
        elif kind == "warning":
            warnings = [*warnings, str(event.get("message"))][-MAX_WARNINGS:]
            progress["warnings"] = warnings
        elif kind == "error":
            progress["error"] = {"message": event.get("message"), "hint": event.get("hint")}
        elif kind in ("stopped", "done"):
            progress["phase"] = kind
            progress.update({k: event[k] for k in ("step", "epoch", "output") if k in event})
    return summary


def _lines(data: bytes, *, cut: bool, skip_blank: bool) -> list[str]:
    """The lines of `data` (\\r, \\n and \\r\\n all end one); with `cut`, the first is dropped (it may be cut)."""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.splitlines()[1:] if cut else text.splitlines()
    return [line.rstrip() for line in lines if line.strip()] if skip_blank else lines


def tail_lines(path: Path, lines: int, *, skip_blank: bool = False) -> str:
    """The last `lines` lines of a text file, blank ones left out with `skip_blank` ('' when it does not exist yet
    or cannot be read); read backwards from its end in growing blocks, at most MAX_READ_BYTES of it, so a long log
    is not read whole for its last lines."""
    if lines < 1:
        return ""
    try:
        with open(path, "rb") as handle:
            position, data = handle.seek(0, 2), b""
            kept = _lines(data, cut=False, skip_blank=skip_blank)
            while position > 0 and len(kept) < lines and len(data) < MAX_READ_BYTES:
                step = min(max(_TAIL_BLOCK, len(data)), MAX_READ_BYTES - len(data), position)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
                kept = _lines(data, cut=position > 0, skip_blank=skip_blank)
    except OSError:
        return ""
    return "\n".join(kept[-lines:]) + ("\n" if kept else "")


def log_tail(folder: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` non-empty lines of the job's train.log ('' when there is none), without a final newline."""
    return tail_lines(folder / LOG_NAME, lines, skip_blank=True).removesuffix("\n")


def has_saved_state(folder: Path) -> bool:
    """True when the job's output folder holds a complete saved training state to resume from."""
    return JobFolder(folder).has_saved_state()
