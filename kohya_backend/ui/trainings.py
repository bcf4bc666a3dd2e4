"""Callbacks of the Trainings List: the table (polled), the delivery stamp, the selected job's log, loss plot and
samples, and Cancel / Resume / Delete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.runner import EVENTS_NAME
from kohya_backend.service.training import TrainingService
from kohya_backend.ui.job_views import JobViews
from kohya_backend.ui.present import (
    JOB_HEADERS,
    delivery_stamp,
    error_markdown,
    job_markdown,
    job_row,
)

PAGE_SIZE = 50
LOG_TAIL_LINES = 30


class TrainingsActions:
    """The right column's callbacks, bound to one TrainingService."""

    def __init__(self, service: TrainingService) -> None:
        self.service = service
        self.views = JobViews()  # shared by every browser tab: polls read only what changed

    def details(self, job_id: str | None) -> tuple[str, str, Any, list[tuple[Any, str]]]:
        """(headline, log tail, loss plot data, samples) of one job; empty when none is selected."""
        if not job_id:
            return "Select a job in the list.", "", None, []
        try:
            job = self.service.show(job_id, log_lines=LOG_TAIL_LINES)
        except TrainManagementError as exc:
            return error_markdown(exc), "", None, []
        folder = Path(job["folder"])
        plot = self.views.loss_plot(job_id, folder / EVENTS_NAME)
        return job_markdown(job), job["log_tail"], plot, self.views.samples(job_id, folder)

    def mark(self, selected: str | None) -> str:
        """What the auto-refresh polls: a short text that changes whenever a job's status, step or phase (or the
        selection) changes."""
        jobs = self.service.list(limit=PAGE_SIZE)["jobs"]
        marks = [
            [j["id"], j["status"], j["updated_at"], (j["progress"] or {}).get("step"),
             (j["progress"] or {}).get("phase")]
            for j in jobs
        ]  # fmt: skip
        return json.dumps([*marks, selected])

    def refresh(self, selected: str | None) -> tuple[Any, ...]:
        """(table, delivery stamp, job choices, and the selected job's headline, log, loss plot, samples)."""
        import pandas as pd

        jobs = self.service.list(limit=PAGE_SIZE)["jobs"]
        ids = [j["id"] for j in jobs]
        if selected not in ids:
            selected = None
        table = pd.DataFrame([job_row(j) for j in jobs], columns=JOB_HEADERS)
        status, log, plot, samples = self.details(selected)
        choices = gr.update(choices=ids, value=selected)
        return table, delivery_stamp(jobs), choices, status, log, gr.update(value=plot), samples

    def select_row(self, table: Any, evt: gr.SelectData) -> Any:
        """A click on a row of the table selects that job."""
        rows = table.values.tolist() if hasattr(table, "values") else table
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            return gr.update(value=str(rows[int(index)][0]))
        except (IndexError, TypeError, ValueError):
            return gr.update()

    def cancel(self, job_id: str | None) -> str:
        """Cancel the selected job (a running trainer is stopped)."""
        return self._act("cancel", job_id)

    def resume(self, job_id: str | None) -> str:
        """Queue the selected interrupted, failed or cancelled job again."""
        return self._act("resume", job_id)

    def delete(self, job_id: str | None) -> str:
        """Delete the selected finished job and its folder."""
        return self._act("delete", job_id)

    def _act(self, action: str, job_id: str | None) -> str:
        """Cancel, resume or delete a job; the message says what happened or why not."""
        if not job_id:
            return "Select a job first."
        try:
            if action == "delete":
                note = self.service.delete(job_id)  # what happened to a worker's copy, if it ran on one
                done = f"Deleted job {job_id} (its delivered LoRA stays in the Lora folder)"
                return f"{done}; {note}." if note else f"{done}."
            job = self.service.cancel(job_id) if action == "cancel" else self.service.resume(job_id)
        except TrainManagementError as exc:
            return f"❌ {error_markdown(exc)}"
        return f"Job {job_id}: **{job['status']}**" + (f" ({job['reason']})" if job.get("reason") else "")
