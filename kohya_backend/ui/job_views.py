"""What the Trainings List shows of a selected job, kept between polls: loss rows read incrementally from its
events.jsonl and sample thumbnails decoded once per file.

One JobViews serves every browser tab of the tab's Blocks (gradio runs their events on several threads), so a
poll costs a stat of the events file and of the sample folder, not a re-read of the whole file or a re-decode of
every sample. Each view comes with a version that changes whenever the view does (never reused, by any job), so a
page that shows a version already need not be sent the view again. No gradio here.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kohya_backend.job_folder import JobFolder
from kohya_backend.jobs.progress import EventTail
from kohya_backend.ui.present import loss_rows
from kohya_backend.ui.thumbnails import ThumbnailCache

MAX_JOBS = 4  # jobs whose loss rows and thumbnails are kept (the selected ones of the open browser tabs)
MAX_SAMPLES = 12
THUMBNAIL_PX = 256


@dataclass
class _Loss:
    lines: int = 0  # events.jsonl lines consumed
    size: int = 0  # the file's size when it was last read to its end
    rows: list[dict[str, Any]] = field(default_factory=list)
    frame: Any = None  # the plot's DataFrame of `rows` (built when they change)
    version: int = 0  # JobViews' number of this `frame` (0: no rows yet)


@dataclass
class _Samples:
    signature: tuple[tuple[str, int, int], ...] = ()
    items: list[tuple[Any, str]] = field(default_factory=list)
    version: int = 0  # JobViews' number of these `items` (0: none yet)


def _sample_files(sample_dir: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the newest MAX_SAMPLES sample PNGs, oldest first ([] without the folder)."""
    found = []
    try:
        for path in sample_dir.glob("*.png"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            found.append((path.name, stat.st_size, stat.st_mtime_ns))
    except OSError:
        return []
    found.sort(key=lambda f: (f[2], f[0]))
    return found[-MAX_SAMPLES:]


class JobViews:
    """Loss-plot data and sample thumbnails per job, updated from what changed since the last poll."""

    def __init__(self, max_jobs: int = MAX_JOBS) -> None:
        self.max_jobs = max_jobs
        self._tail = EventTail()
        self._loss: OrderedDict[str, _Loss] = OrderedDict()
        self._samples: OrderedDict[str, _Samples] = OrderedDict()
        self._thumbnails = ThumbnailCache(THUMBNAIL_PX, max_entries=max_jobs * MAX_SAMPLES)
        self._lock = threading.Lock()
        self._versions = itertools.count(1)

    def _entry(self, table: OrderedDict[str, Any], job_id: str, new: Any) -> Any:
        entry = table.pop(job_id, None) or new()
        table[job_id] = entry  # most recently used last
        while len(table) > self.max_jobs:
            old, _ = table.popitem(last=False)
            if table is self._loss:
                self._tail.forget(old)
        return entry

    def loss_plot(self, job_id: str, events_path: Path) -> tuple[Any, int]:
        """(the loss plot's DataFrame (step, value, series) of a job, or None before its first step; its version)."""
        with self._lock:
            loss: _Loss = self._entry(self._loss, job_id, _Loss)
            try:
                size = events_path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size < loss.size:  # replaced or truncated: read it again from the start
                loss = self._loss[job_id] = _Loss()
                self._tail.forget(job_id)
            if size != loss.size:
                loss.size = size
                while True:  # EventTail reads a bounded block per call
                    events, loss.lines = self._tail.read(job_id, events_path, loss.lines)
                    if not events:
                        break
                    new_rows = loss_rows(events)
                    if new_rows:
                        loss.rows.extend(new_rows)
                        loss.frame = None
            if loss.frame is None and loss.rows:
                import pandas as pd

                loss.frame = pd.DataFrame(loss.rows)
                loss.version = next(self._versions)
            return loss.frame, loss.version

    def samples(self, job_id: str, folder: Path) -> tuple[list[tuple[Any, str]], int]:
        """(the newest sample images of a job as (thumbnail, file name), oldest first, each file decoded once; their
        version)."""
        sample_dir = JobFolder(folder).samples
        files = tuple(_sample_files(sample_dir))
        with self._lock:
            cached: _Samples = self._entry(self._samples, job_id, _Samples)
            if files == cached.signature:
                return list(cached.items), cached.version
            shown = [(self._thumbnails.get(sample_dir / name), name) for name, _, _ in files]
            cached.items = [
                (image, name) for image, name in shown if image is not None
            ]  # unreadable: not yet
            cached.signature = files
            cached.version = next(self._versions)
            return list(cached.items), cached.version
