"""Callbacks of the Trainings List: the table (polled), the delivery stamp, the selected job's log, loss plot,
samples, downloads and epoch comparison grid, and Cancel / Resume / Delete / Duplicate / Continue training /
Send to txt2img.

The refresh that the poll triggers sends no inputs on gradio 4 (compat.SESSION_KEYED): the page's selected job and
what its downloads show are kept per page in PageSessions, and on 3.41 they come as inputs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import gradio as gr
import tomlkit

from kohya_backend.errors import TrainManagementError
from kohya_backend.job_folder import JobFolder
from kohya_backend.jobs.runner import EVENTS_NAME
from kohya_backend.service.training import TrainingService
from kohya_backend.ui.compat import session_of
from kohya_backend.ui.confirm import ask, dismissed
from kohya_backend.ui.create_job import CreateJobActions
from kohya_backend.ui.job_views import JobViews
from kohya_backend.ui.origin_guard import read_only
from kohya_backend.ui.present import (
    JOB_HEADERS,
    JOB_ID_COLUMN,
    delivery_stamp,
    error_markdown,
    fm_label_of,
    job_markdown,
    job_row,
)
from kohya_backend.ui.sessions import PageSessions

PAGE_SIZE = 50
LOG_TAIL_LINES = 30
MAX_DOWNLOAD_SAMPLES = 8
FINAL = "final"
_EPOCH_CHOICE = re.compile(r"epoch ([0-9]{1,9})")


def epoch_label(epoch: int) -> str:
    return f"epoch {epoch}"


def epoch_number(choice: object) -> int | None:
    """The epoch an Epoch choice names (None: the final LoRA); a value the list never offers (a crafted request) is
    a TrainManagementError saying what to choose."""
    if choice is None or choice in ("", FINAL):
        return None
    found = _EPOCH_CHOICE.fullmatch(str(choice))
    if found is None:
        raise TrainManagementError(
            f"{str(choice)[:40]!r} is not an epoch of the job",
            f"choose {FINAL!r} or one of its saved epochs ('{epoch_label(1)}', ...) in the Epoch list",
        )
    return int(found.group(1))


def lora_weight(value: object) -> float:
    """The weight of a `<lora:...>` prompt (1.0 when none was sent); TrainManagementError unless a finite number."""
    if value is None:
        return 1.0
    try:
        weight = float(str(value))
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise TrainManagementError(f"weight {str(value)[:40]!r} is not a number", "set a weight such as 0.8")
    return weight


def _shown_key(parts: dict[str, str]) -> str:
    """What a page shows of its selected job, as the text kept in its State (3.41) or on the server (4.x)."""
    return json.dumps(parts, sort_keys=True)


def _shown_parts(key: object) -> dict[str, str]:
    """_shown_key's parts ({} for a page that shows nothing yet, or for any other value a request may carry)."""
    try:
        parts = json.loads(key) if isinstance(key, str) and key else {}
    except ValueError:
        return {}
    return {k: v for k, v in parts.items() if isinstance(v, str)} if isinstance(parts, dict) else {}


class TrainingsActions:
    """The right column's callbacks, bound to one TrainingService."""

    def __init__(self, service: TrainingService, editor: CreateJobActions) -> None:
        self.service = service
        self.editor = editor  # Duplicate fills the editor through its actions
        self.views = JobViews()  # shared by every browser tab: polls read only what changed
        self.sessions = PageSessions()

    # -- what the page shows -----------------------------------------------------------------------------------

    def mark(self) -> str:
        """What the auto-refresh polls: a short text that changes whenever a job's status, step or phase changes."""
        jobs = self.service.list(limit=PAGE_SIZE)["jobs"]
        marks = [
            [j["id"], j["status"], j["updated_at"], (j["progress"] or {}).get("step"),
             (j["progress"] or {}).get("phase"), j.get("queue_position")]
            for j in jobs
        ]  # fmt: skip
        return json.dumps(marks)

    @read_only
    def details(
        self, request: gr.Request, job_id: str | None = None, shown: str | None = None
    ) -> tuple[Any, ...]:
        """(headline, log tail, loss plot data, samples, downloads, grid, epoch choices, shown) of the selected job.

        `shown` says what the page shows already (_shown_key): the loss plot and the samples are sent only when
        they changed, and the downloads, the grid and the epoch choices only when the job, its status or its samples
        changed (a poll while another job trains must not put the chosen epoch back to final); the rest is gr.update().
        """
        session = session_of(request)
        self.sessions.put(session, job=job_id)
        before = _shown_parts(self.sessions.value(session, "shown", shown))
        if not job_id:
            self.sessions.put(session, shown="")
            return (
                "Select a job in the list.",
                "",
                None,
                [],
                None,
                None,
                gr.update(choices=[], value=None),
                "",
            )
        try:
            job = self.service.show(job_id, log_lines=LOG_TAIL_LINES)
        except TrainManagementError as exc:
            self.sessions.put(session, shown="")
            return error_markdown(exc), "", None, [], None, None, gr.update(choices=[], value=None), ""
        folder = Path(job["folder"])
        plot, plot_version = self.views.loss_plot(job_id, folder / EVENTS_NAME)
        samples, samples_version = self.views.samples(job_id, folder)
        newest = samples[-1][1] if samples else ""  # the count alone stops changing at JobViews' MAX_SAMPLES
        now = {
            "files": f"{job_id}|{job['status']}|{len(samples)}|{newest}",
            "plot": f"{job_id}|{plot_version}",
            "samples": f"{job_id}|{samples_version}",
        }
        downloads: Any = gr.update()
        grid: Any = gr.update()
        epochs: Any = gr.update()
        if now["files"] != before.get("files"):
            downloads = self._downloads(job, folder, samples) or None
            grid, epochs = self._epochs(job, folder)
        plot_out = plot if now["plot"] != before.get("plot") else gr.update()
        samples_out = samples if now["samples"] != before.get("samples") else gr.update()
        key = _shown_key(now)
        self.sessions.put(session, shown=key)
        return job_markdown(job), job["log_tail"], plot_out, samples_out, downloads, grid, epochs, key

    def _downloads(self, job: dict[str, Any], folder: Path, samples: list[tuple[Any, str]]) -> list[str]:
        """The files the page offers: the LoRA (once written), the epoch grid and the newest samples."""
        paths = JobFolder(folder)
        files = [paths.lora(job["output_name"]), paths.grid(job["output_name"])]
        files += [paths.samples / name for _, name in samples[-MAX_DOWNLOAD_SAMPLES:]]
        return [str(p) for p in files if p.is_file()]

    def _epochs(self, job: dict[str, Any], folder: Path) -> tuple[Any, Any]:
        """(grid image path, epoch choices) of a completed job; (None, empty) before."""
        if job["status"] != "completed":
            return None, gr.update(choices=[], value=None)
        grid = JobFolder(folder).grid(job["output_name"])
        choices = [FINAL, *(epoch_label(e) for e in self.service.epochs(job["id"]))]
        return (str(grid) if grid.is_file() else None), gr.update(choices=choices, value=FINAL)

    @read_only
    def refresh(
        self, request: gr.Request, selected: str | None = None, shown: str | None = None
    ) -> tuple[Any, ...]:
        """(table, delivery stamp, job choices, then details()) for the page's selected job."""
        import pandas as pd

        selected = self.sessions.value(session_of(request), "job", selected)
        jobs = self.service.list(limit=PAGE_SIZE)["jobs"]
        ids = [j["id"] for j in jobs]
        if selected not in ids:
            selected = None
        table = pd.DataFrame([job_row(j) for j in jobs], columns=JOB_HEADERS)
        choices = gr.update(choices=ids, value=selected)
        return (table, delivery_stamp(jobs), choices, *self.details(request, selected, shown))

    @read_only
    def select_row(
        self, request: gr.Request, table: Any, evt: gr.SelectData, shown: str | None = None
    ) -> tuple[Any, ...]:
        """A click on a row of the table (or Enter on it) opens that job: (job choice, then details())."""
        rows = table.values.tolist() if hasattr(table, "values") else table
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            job_id = str(rows[int(index)][JOB_ID_COLUMN])
        except (IndexError, TypeError, ValueError):
            return (gr.update(), *[gr.update()] * 8)
        return (gr.update(value=job_id), *self.details(request, job_id, shown))

    # -- actions -----------------------------------------------------------------------------------------------

    def cancel(self, job_id: str | None) -> str:
        """Cancel the selected job (a running trainer is stopped; its state is saved for Resume)."""
        return self._act("cancel", job_id)

    def resume(self, job_id: str | None) -> str:
        """Queue the selected interrupted, failed or cancelled job again (from its saved state)."""
        return self._act("resume", job_id)

    @read_only
    def ask_delete(self, job_id: str | None) -> tuple[Any, ...]:
        """Ask before deleting the selected job: (row, question, pending, message)."""
        if not job_id:
            return (*dismissed(), "Select a job first.")
        question = (
            f"Delete job **{job_id}** and its folder (log, samples, saved states)? Its delivered LoRA stays."
        )
        return (*ask(question, job_id), "")

    def delete(self, job_id: str | None) -> tuple[Any, ...]:
        """Delete the job named when it was asked: (row, question, pending, message)."""
        if not job_id:
            return (*dismissed(), "")
        return (*dismissed(), self._act("delete", job_id))

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

    @read_only
    def duplicate(self, job_id: str | None, current: str, baseline: str) -> tuple[Any, ...]:
        """Put the selected job's FM type, instance, model, dataset and config in the editor (asking first when it
        holds edits): the editor's fill outputs, then a message."""
        if not job_id:
            return (*self.editor.apply_fill(None), "Select a job first.")
        try:
            copy = self.service.duplicate(job_id)
        except TrainManagementError as exc:
            return (*self.editor.apply_fill(None), f"❌ {error_markdown(exc)}")
        instance = next(
            (
                c
                for c in self.editor.instance_choices(None)["choices"]
                if c.endswith(f"[{copy['instance_type']}]")
            ),
            None,
        )
        fill = {
            "text": copy["config_params"], "default": copy["config_params"], "fm": fm_label_of(copy["fm_type"]),
            "instance": instance, "model": copy["model"], "dataset": copy["dataset"],
            "what": f"job **{job_id}**'s config",
        }  # fmt: skip
        done = f"Job {job_id}'s settings are in the editor: check them, then press **Create Training Job**."
        return (*self.editor.fill(fill, current, baseline), done)

    def continue_training(self, job_id: str | None) -> str:
        """Queue a new job that trains the selected completed job's LoRA further."""
        if not job_id:
            return "Select a job first."
        try:
            job = self.service.continue_training(job_id)
        except TrainManagementError as exc:
            return f"❌ {error_markdown(exc)}"
        start = "its saved state" if "resume" in tomlkit.parse(job.config_toml) else "its LoRA"
        return f"✅ Job **{job.id}** (`{job.output_name}`) queued: it continues job {job_id} from {start}."

    @read_only
    def lora_prompt(self, job_id: str | None, epoch: str | None, weight: float) -> tuple[str, str]:
        """(message, `<lora:NAME:WEIGHT>`) for the chosen epoch of the selected job ('' when there is none); the
        page's script then puts the prompt text into txt2img."""
        if not job_id:
            return "Select a completed job first.", ""
        try:
            number, strength = epoch_number(epoch), lora_weight(weight)
            prompt = self.service.lora_prompt(job_id, number, strength)
        except TrainManagementError as exc:
            return f"❌ {error_markdown(exc)}", ""
        return f"Sent `{prompt}` to txt2img.", prompt
