"""One remote job's background thread: send its inputs, submit it, mirror its progress here, fetch its LoRA.

The scheduler never waits on the network: it polls the session's outcome. The session keeps the job folder's
contract as if the trainer ran here: the worker's events (paths rewritten into this folder) are appended to
events.jsonl and its log to train.log, the files its events name (LoRAs, samples) are downloaded into output/, and
result.json is written at the end. DIR/run.json records the worker and the remote job id (plus where mirroring
started in both files), so a restarted host re-attaches and continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tomlkit

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.allocation import gpus_of
from kohya_backend.jobs.registry import WorkerEntry
from kohya_backend.jobs.runner import (
    EVENTS_NAME,
    LOG_NAME,
    RESULT_NAME,
    RUN_NAME,
    RunStatus,
    read_json,
    write_json_atomic,
)
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job, validate_job_id
from kohya_backend.jobs.transfer import (
    CHUNK_BYTES,
    Cancelled,
    LocalInput,
    TransferStats,
    Uploader,
    collect_input,
)
from kohya_backend.jobs.worker_client import (
    MAX_DOWNLOAD_BYTES,
    WorkerAnswerInvalid,
    WorkerClient,
    WorkerRejected,
    WorkerUnreachable,
)
from kohya_backend.jobs.worker_protocol import INPUT_KEYS, OUTPUT_KEYS, InvalidName, validate_relpath
from kohya_backend.models.hashing import Sha256Cache, sha256_file

log = logging.getLogger(__name__)

RUNNER_NAME = "worker"
_RESUMABLE = frozenset(status.value for status in JobStatus.resumable())
_SETTLED = frozenset(status.value for status in (*JobStatus.terminal(), JobStatus.INTERRUPTED))
_DOWNLOADED_SUFFIXES = (".safetensors", ".png", ".jpg", ".jpeg", ".webp")
MAX_IMAGE_BYTES = 256 << 20  # a sample image; LoRAs are capped by the view's size or MAX_DOWNLOAD_BYTES
T = TypeVar("T")


@dataclass(frozen=True)
class RemoteOptions:
    """How patient a session is: how long a silent worker may stay silent, backoff, long-poll and chunk size."""

    lost_after_s: float = 120.0
    max_backoff_s: float = 15.0
    events_wait_s: float = 10.0
    chunk_bytes: int = CHUNK_BYTES
    progress_every_s: float = 1.0


class WorkerLost(Exception):
    """The worker did not answer for longer than lost_after_s."""


class _Stopped(Exception):
    """The host is shutting down: leave the remote job alone, a restarted host re-attaches."""


def _complete_lines(path: Path) -> int:
    """Drop a half-written last line (a crash mid-append) and return the number of complete lines."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return data.count(b"\n", 0, end)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def job_inputs(job: Job) -> dict[str, Path]:
    """The files and folders a job's config reads (model, dataset, tokenizer, ...), by config key.

    Relative paths are relative to the job folder (the trainer's working directory). A tokenizer folder that does
    not exist is left out: the worker then finds a tokenizer of its own, as a local trainer would.
    """
    config = tomlkit.parse(job.config_toml).unwrap()
    found = {}
    for key in INPUT_KEYS:
        if config.get(key) in (None, ""):
            continue
        path = job.folder / Path(str(config[key])).expanduser()  # an absolute path replaces the folder
        if key == "tokenizer_cache_dir" and not path.exists():
            continue
        found[key] = path
    return found


def remote_config(job: Job) -> dict[str, Any]:
    """The job's config without paths (the worker sets those from the inputs it materialises)."""
    config = tomlkit.parse(job.config_toml).unwrap()
    return {k: v for k, v in config.items() if k not in INPUT_KEYS and k not in OUTPUT_KEYS}


class RemoteSession(threading.Thread):
    """Drives one job on one worker until it settles there (or the worker is lost, or the host stops)."""

    def __init__(
        self,
        job: Job,
        worker: WorkerEntry,
        *,
        client_id: str,
        options: RemoteOptions,
        resume: bool,
    ) -> None:
        super().__init__(name=f"remote-{job.id}", daemon=True)
        self.job = job
        self.worker = worker
        self.client_id = client_id
        self.options = options
        self.resume = resume
        self.cancel_requested = threading.Event()
        self.stop_requested = threading.Event()
        self.outcome: RunStatus | None = None
        self.stats = TransferStats(worker.name)
        self._client = WorkerClient(worker.url, worker.token, read_timeout_s=options.events_wait_s + 30)
        self._last_contact = time.monotonic()
        self._last_progress = 0.0
        self._events = job.folder / EVENTS_NAME
        self._log = job.folder / LOG_NAME
        self._downloaded: dict[Path, str] = {}  # sha256s download() verified: the LoRA is not read again

    # -- the thread ---------------------------------------------------------------------------------------

    def run(self) -> None:
        """Run the job remotely; whatever happens, end with an outcome (unless the host is stopping)."""
        try:
            self.outcome = self._run()
        except _Stopped:
            return
        except WorkerLost as exc:
            self.outcome = RunStatus(False, None, lost=str(exc))
        except Cancelled:
            self.outcome = RunStatus(
                False, None, lost=f"cancelled while sending files to worker {self.worker.name}"
            )
        except TrainManagementError as exc:
            self.outcome = self._fail(exc.message, exc.hint)
        except Exception as exc:  # never leave the scheduler polling a dead thread
            log.exception("remote session of job %s failed", self.job.id)
            self.outcome = self._fail(
                f"the remote runner failed: {exc!r}", "see the host's log; resume the job"
            )
        finally:
            self._client.close()

    def _run(self) -> RunStatus:
        record = read_json(self.job.folder / RUN_NAME) or {}
        remote = (record.get("remote") or {}).get(self.worker.name)
        remote_id = str(remote["job"]) if isinstance(remote, dict) and remote.get("job") else None
        if remote_id is not None:
            try:
                validate_job_id(remote_id)
            except TrainManagementError as exc:
                raise TrainManagementError(
                    f"{RUN_NAME} names remote job {remote_id[:80]!r}, which is not a job id",
                    f"delete {RUN_NAME} in the job folder's 'remote' entry for this worker, then resume the job",
                ) from exc
        view = self._call(lambda c: c.job(remote_id)) if remote_id else None
        if view is None or not isinstance(remote, dict):
            if self.cancel_requested.is_set():
                return RunStatus(
                    False, None, lost=f"cancelled before the job reached worker {self.worker.name}"
                )
            view, remote = self._send_and_submit(record)
        elif self.resume and view["status"] in _RESUMABLE:
            self._tolerate_conflict(lambda c: c.resume(str(view["id"])))
        return self._follow(str(view["id"]), remote)

    def _fail(self, message: str, hint: str | None) -> RunStatus:
        error = {"message": f"worker {self.worker.name}: {message}", "hint": hint}
        with contextlib.suppress(OSError):
            write_json_atomic(
                self.job.folder / RESULT_NAME, {"status": "failed", "error": error, "output": None}
            )
        return RunStatus(False, 2)

    # -- retries ------------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[WorkerClient], T]) -> T:
        """Call the worker, retrying network errors with exponential backoff until lost_after_s of silence.

        Silence counts from the last answer, bytes accepted, or the start of this call (local work such as
        hashing a checkpoint is not the worker's silence).
        """
        delay = 0.5
        started = time.monotonic()
        while True:
            if self.stop_requested.is_set():
                raise _Stopped()
            try:
                out = fn(self._client)
            except WorkerUnreachable as exc:
                silent = time.monotonic() - max(self._last_contact, started)
                if silent > self.options.lost_after_s:
                    raise WorkerLost(
                        f"worker {self.worker.name} ({self.worker.url}) stopped answering {silent:.0f} s ago "
                        f"({exc.message}); resume the job to continue there when it is back, or on another worker"
                    ) from exc
                self.stop_requested.wait(delay)
                delay = min(delay * 2, self.options.max_backoff_s)
                continue
            self._last_contact = time.monotonic()
            if self.stop_requested.is_set():
                raise _Stopped()  # nothing is written after close(): a new session may own the files
            return out

    def _tolerate_conflict(self, fn: Callable[[WorkerClient], object]) -> None:
        """Cancel or resume; a 409 means the remote job moved on by itself (it settled, or already runs)."""
        try:
            self._call(fn)
        except WorkerRejected as exc:
            if exc.status != 409:
                raise

    # -- sending ------------------------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        """A line in the local train.log (only before mirroring starts: afterwards the log is the worker's)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self._log, "a", encoding="utf-8") as handle:
            handle.write(f"=== {stamp} {text}\n")

    def _event(self, kind: str, **fields: Any) -> None:
        with open(self._events, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"kind": kind, "time": time.time(), **fields}) + "\n")

    def _progress(self, stats: TransferStats, *, force: bool = False) -> None:
        now = time.monotonic()
        self._last_contact = now  # the worker is taking bytes: it is there
        if force or now - self._last_progress >= self.options.progress_every_s:
            self._last_progress = now
            self._event("upload", **stats.event())

    def _upload_cancelled(self) -> bool:
        if self.stop_requested.is_set():
            raise _Stopped()
        return self.cancel_requested.is_set()

    def _send_and_submit(self, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        self._note(f"sending job {self.job.id} to worker {self.worker.name} ({self.worker.url})")
        hashes = Sha256Cache()  # read now: the trainer or another job may have added hashes
        try:
            inputs = [collect_input(key, path, hashes) for key, path in job_inputs(self.job).items()]
        finally:
            hashes.save()
        uploader = Uploader(
            self._client,
            self.stats,
            cancelled=self._upload_cancelled,
            progress=self._progress,
            chunk_bytes=self.options.chunk_bytes,
        )
        self._call(lambda c: uploader.ensure(inputs))
        self._progress(self.stats, force=True)
        self._note(self._summary(inputs))
        spec: dict[str, Any] = {
            "client_key": f"{self.client_id}:{self.job.id}:{self.worker.name}",
            "fm_type": self.job.fm_type,
            "output_name": self.job.output_name,
            "config_params": remote_config(self.job),
            "inputs": {item.key: item.spec() for item in inputs},
        }
        if gpus_of(self.job.params) > 1:
            spec["gpus"] = gpus_of(self.job.params)  # the worker gives the job that many of its GPUs
        try:
            view = self._call(lambda c: c.submit(spec))
        except WorkerRejected as exc:
            if exc.status != 409 or "missing" not in exc.detail:
                raise
            self._call(
                lambda c: uploader.ensure(inputs)
            )  # blobs vanished from the worker meanwhile: once more
            view = self._call(lambda c: c.submit(spec))
        self._event("submitted", worker=self.worker.name, job=view["id"])
        self._note(f"submitted as job {view['id']} on worker {self.worker.name}; its log follows")
        remote = {
            "job": view["id"],
            "events_base": _complete_lines(self._events),
            "log_base": _size(self._log),
        }
        record = read_json(self.job.folder / RUN_NAME) or record
        record.setdefault("remote", {})[self.worker.name] = remote
        write_json_atomic(self.job.folder / RUN_NAME, record)
        return view, remote

    def _summary(self, inputs: list[LocalInput]) -> str:
        parts = []
        for item in inputs:
            seen = self.stats.by_key.get(item.key, {})
            there = seen.get("already_there", 0)
            parts.append(
                f"{item.key}={item.name} ({len(item.files)} file(s), {item.size} B, {there} B already there)"
            )
        s = self.stats
        return f"inputs: {'; '.join(parts)}; sent {s.sent} B in {s.files_sent} file(s), skipped {s.skipped} B"

    # -- following ----------------------------------------------------------------------------------------

    def _follow(self, remote_id: str, remote: dict[str, Any]) -> RunStatus:
        lines = _complete_lines(self._events) - int(remote["events_base"])
        cancel_sent = False
        settled_before = False  # the previous answer's status (read after its events) was settled
        while True:
            if self.cancel_requested.is_set() and not cancel_sent:
                self._tolerate_conflict(lambda c: c.cancel(remote_id))
                cancel_sent = True
            after = max(lines, 0)
            answer = self._call(lambda c: c.events(remote_id, after, self.options.events_wait_s))  # noqa: B023
            events = answer.get("events") or []
            self._mirror_events(remote_id, events)
            lines += len(events)
            self._mirror_log(remote_id, int(remote["log_base"]))
            # A 1.0 worker sends no `settled`: a settled status in the previous answer stands for it.
            settled = answer.get("settled", settled_before)
            settled_before = answer.get("status") in _SETTLED
            if settled and not events:  # settled before these were read: they were the last
                return self._finish(remote_id)

    def _local_path(self, value: object) -> Path | None:
        """A worker's job-relative output path as a path in this job folder (None when it is not one)."""
        try:
            rel = validate_relpath(value, what="output path")
        except InvalidName:
            return None
        return self.job.folder / rel if rel.startswith("output/") else None

    def _mirror_events(self, remote_id: str, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        lines = []
        for event in events:
            for key in ("path", "output"):
                if key in event:
                    local = self._local_path(event[key])
                    if local is not None and event.get("kind") in ("saved", "sample", "grid"):
                        self._fetch(remote_id, local)
                    event[key] = str(local) if local is not None else None
            lines.append(json.dumps(event) + "\n")
        with open(self._events, "a", encoding="utf-8") as handle:
            handle.write("".join(lines))

    def _fetch(self, remote_id: str, local: Path, size: int | None = None) -> None:
        """Download a file the worker's job wrote (capped at `size` when the worker reported it)."""
        suffix = local.suffix.lower()
        if suffix not in _DOWNLOADED_SUFFIXES:
            return
        rel = local.relative_to(self.job.folder).as_posix()
        cap = (
            size if size is not None else MAX_DOWNLOAD_BYTES if suffix == ".safetensors" else MAX_IMAGE_BYTES
        )
        try:
            digest, _ = self._call(lambda c: c.download(remote_id, rel, local, max_bytes=cap))
        except (WorkerRejected, WorkerAnswerInvalid) as exc:  # e.g. an epoch file removed meanwhile
            log.info("job %s: %s not downloaded: %s", self.job.id, rel, exc.message)
            return
        self._downloaded[local] = digest

    def _holds(self, local: Path, sha256: str) -> bool:
        """True when `local` is the file with `sha256`: known when this session downloaded it, else (e.g. after a
        restart) hashed."""
        if not local.is_file():
            return False
        known = self._downloaded.get(local)
        return (known if known is not None else sha256_file(local)) == sha256

    def _mirror_log(self, remote_id: str, base: int) -> None:
        while True:
            offset = max(0, _size(self._log) - base)
            data, size, _status = self._call(lambda c: c.log(remote_id, offset))  # noqa: B023
            if data:
                with open(self._log, "ab") as handle:
                    handle.write(data)
            if not data or offset + len(data) >= size:
                return

    def _finish(self, remote_id: str) -> RunStatus:
        view = self._call(lambda c: c.job(remote_id))
        if view is None:
            return RunStatus(False, None, lost=f"worker {self.worker.name} no longer has job {remote_id}")
        status, reason = view["status"], view.get("reason") or ""
        where = f"worker {self.worker.name}"
        if status == "completed":
            return self._complete(remote_id, view)
        if status == "failed":
            return self._fail(reason, "fix what the message says, then resume or submit the job again")
        if status == "cancelled":
            return RunStatus(False, None, lost=f"cancelled on {where}: {reason}")
        return RunStatus(
            False, None, lost=f"interrupted on {where}: {reason}; resume the job to continue there"
        )

    def _complete(self, remote_id: str, view: dict[str, Any]) -> RunStatus:
        output = view.get("output") or {}
        local = self._local_path(output.get("path"))
        if local is None or not isinstance(output.get("sha256"), str):
            return self._fail("the job completed but names no LoRA file", "resume the job to train it again")
        size = output.get("size") if isinstance(output.get("size"), int) else None
        if not self._holds(local, output["sha256"]):
            self._fetch(remote_id, local, size)
        if not local.is_file():
            return self._fail(f"the LoRA {output.get('path')} could not be downloaded", "resume the job")
        result = view.get("result") or {}
        write_json_atomic(
            self.job.folder / RESULT_NAME,
            {
                "status": "completed",
                "output": str(local),
                "step": result.get("step"),
                "epoch": result.get("epoch"),
                "error": None,
            },
        )
        return RunStatus(False, 0)
