"""S3 inputs and outputs of a job: downloads in its `preparing` phase, the LoRA uploaded after the local save.

A job's config may name `s3://` objects for its model, dataset, regularisation images, network_weights and
sample prompts. Before the trainer starts, the runner fetches them through the home's S3 cache (an object already
cached is not downloaded again; a cut download resumes) into `JOB/s3-inputs/` (hard links to the cache) and writes
the job folder's config.toml with those local paths: the trainer only ever sees local files. Progress goes to the
job's events as `download` events ("downloading model 1.2/6.9 GB"); a missing object or a refused credential fails
the job with the bucket/key and the AWS error code before any training starts.

A job submitted with `output_dir = "s3://..."` keeps its local output (delivered to the Lora folder as usual) and
records the URI in its params; once the trainer finished, the LoRA with its WebUI sidecar (<name>.json) and preview
(<name>.preview.png) is uploaded there. A failed upload leaves the job completed with a warning naming the error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import tomlkit

from kohya_backend.errors import StorageError, TrainManagementError
from kohya_backend.jobs.runner import (
    EVENTS_NAME,
    LOG_NAME,
    RESULT_NAME,
    LocalRunner,
    RunHandle,
    RunStatus,
    read_json,
    write_json_atomic,
)
from kohya_backend.jobs.store import CONFIG_NAME, Job
from kohya_backend.storage.settings import S3Access
from kohya_backend.storage.sync import sync_prefix
from kohya_backend.storage.uri import S3Uri, is_s3_uri, parse_s3_uri, safe_relative_key

log = logging.getLogger(__name__)

INPUTS_DIR = "s3-inputs"
OUTPUT_PARAM = "s3_output"
S3_INPUT_KEYS: dict[str, str] = {  # config key -> what progress calls it
    "pretrained_model_name_or_path": "model",
    "train_data_dir": "dataset",
    "reg_data_dir": "regularisation images",
    "network_weights": "network weights",
    "sample_prompts": "sample prompts",
}
FOLDER_KEYS = frozenset({"train_data_dir", "reg_data_dir"})
EVENT_EVERY_S = 0.5
EXIT_FAILED = 2
EXIT_STOPPED = 3


def s3_inputs(values: Mapping[str, Any]) -> dict[str, S3Uri]:
    """The config keys that name s3:// objects, parsed (S3UriError for a malformed one)."""
    return {key: parse_s3_uri(values[key], what=key) for key in S3_INPUT_KEYS if is_s3_uri(values.get(key))}


def s3_output(params: Mapping[str, Any]) -> S3Uri | None:
    """The s3:// prefix a job's LoRA is uploaded to, from its params (None: local only)."""
    value = params.get(OUTPUT_PARAM)
    return parse_s3_uri(value, what="output_dir") if value else None


def human_bytes(done: int, total: int) -> str:
    """'1.2/6.9 GB' (the unit chosen by `total`)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if total >= size:
            return f"{done / size:.1f}/{total / size:.1f} {unit}"
    return f"{done}/{total} B"


class EventWriter:
    """Appends events to a job's events.jsonl (the scheduler folds them into progress), progress ones throttled."""

    def __init__(self, folder: Path, every_s: float = EVENT_EVERY_S) -> None:
        self.path = folder / EVENTS_NAME
        self.log = folder / LOG_NAME
        self.every_s = every_s
        self._last = 0.0

    def emit(self, kind: str, **fields: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"kind": kind, "time": time.time(), **fields}) + "\n")

    def progress(self, kind: str, *, force: bool = False, **fields: Any) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            self.emit(kind, **fields)

    def note(self, text: str) -> None:
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


class StageEvents(Protocol):
    """Where stage_inputs reports: a job's EventWriter, or the `train` command's console."""

    def progress(self, kind: str, *, force: bool = False, **fields: Any) -> None: ...

    def note(self, text: str) -> None: ...


@dataclass
class StagedInputs:
    """What staging did: the config values with local paths, and bytes in all and actually downloaded."""

    values: dict[str, Any]
    total: int = 0
    fetched: int = 0
    by_key: dict[str, dict[str, int]] = field(default_factory=dict)


def stage_inputs(
    values: Mapping[str, Any],
    stage_dir: Path,
    access: S3Access,
    *,
    events: StageEvents | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> StagedInputs:
    """Fetch every s3:// input of `values` into `stage_dir/<key>/` (through the cache) and return the values with
    local paths. Files come first as HEADs (a missing object fails before any byte is fetched)."""
    inputs = s3_inputs(values)
    staged = StagedInputs(dict(values))
    if not inputs:
        return staged
    names = {  # a file keeps its name, which must be one (not '..', nor a Windows path like '..\\x')
        key: safe_relative_key(uri.name, what=f"the file name of {uri}")
        for key, uri in inputs.items()
        if key not in FOLDER_KEYS
    }
    client, cache = access.client(), access.cache()
    files = {key: client.head(uri) for key, uri in inputs.items() if key not in FOLDER_KEYS}
    for key, uri in inputs.items():
        what = S3_INPUT_KEYS[key]
        before = staged.fetched

        def report(done: int, total: int, what: str = what, uri: S3Uri = uri, force: bool = False) -> None:
            if events is not None:
                events.progress("download", force=force, what=what, uri=str(uri), done=done, total=total)

        if key in FOLDER_KEYS:
            dest = stage_dir / key
            stats = sync_prefix(client, cache, uri, dest, progress=report, cancelled=cancelled, delete=True)
            staged.total += stats.total
            staged.fetched += stats.transferred
            staged.by_key[key] = {"bytes": stats.total, "fetched": stats.transferred, "files": stats.files}
            report(stats.total, stats.total, force=True)
        else:
            info = files[key]
            dest = stage_dir / key / names[key]
            cached = cache.fetch(client, info, dest, progress=report, cancelled=cancelled)
            staged.total += info.size
            staged.fetched += cached.fetched
            staged.by_key[key] = {"bytes": info.size, "fetched": cached.fetched, "files": 1}
            report(info.size, info.size, force=True)
            if key == "pretrained_model_name_or_path":
                _remember_hash(dest, cached.sha256)
        staged.values[key] = dest.as_posix()
        if events is not None:
            events.note(
                f"{what} {uri}: {human_bytes(staged.fetched - before, staged.by_key[key]['bytes'])} downloaded"
            )
    return staged


def _remember_hash(path: Path, sha256: str) -> None:
    """Tell the shared sha256 cache the staged model's hash, so the trainer does not read it again for it."""
    from kohya_backend.models.hashing import Sha256Cache

    try:
        hashes = Sha256Cache()
        hashes.remember(path, sha256)
        hashes.save()
    except OSError:
        log.debug("the sha256 cache could not be written", exc_info=True)


def output_files(job: Job, final: Path) -> list[tuple[str, bytes | Path]]:
    """(name, file or bytes) to upload for a finished job: the LoRA, its WebUI sidecar and its preview."""
    from kohya_backend.jobs.delivery import last_sample, read_lora_metadata, sidecar

    stem = final.stem
    files: list[tuple[str, bytes | Path]] = [(final.name, final)]
    meta = sidecar(job, read_lora_metadata(final))
    files.append((f"{stem}.json", json.dumps(meta, indent=2).encode("utf-8")))
    preview = last_sample(job)
    if preview is not None:
        files.append((f"{stem}.preview.png", preview))
    return files


def upload_outputs(
    job: Job,
    final: Path,
    uri: S3Uri,
    access: S3Access,
    *,
    events: EventWriter | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> list[str]:
    """Upload the finished LoRA and its sidecars below `uri`; the s3:// URIs written (skipped ones included)."""
    client = access.client()
    files = output_files(job, final)
    staging = job.folder / INPUTS_DIR / "outputs"
    staging.mkdir(parents=True, exist_ok=True)
    paths: list[tuple[str, Path]] = []
    for name, source in files:
        if isinstance(source, bytes):
            path = staging / name
            path.write_bytes(source)
            source = path
        paths.append((name, source))
    total = sum(p.stat().st_size for _, p in paths)
    done, written = 0, []
    for name, path in paths:
        base = done

        def report(now: int, _total: int, base: int = base) -> None:
            if events is not None:
                events.progress("s3_upload", uri=str(uri), done=base + now, total=total)

        target = uri.child(name)
        client.upload_file(path, target, progress=report, cancelled=cancelled)
        written.append(str(target))
        done += path.stat().st_size
    if events is not None:
        events.emit("s3_uploaded", uris=written)
        events.note(f"uploaded to {uri}: {', '.join(n for n, _ in paths)}")
    return written


@dataclass
class _S3Run:
    """A job with S3 inputs or outputs, while this runner works on it."""

    job: Job
    device: str | None
    resume: bool
    output: S3Uri | None
    phase: str = "staging"  # staging -> training -> uploading
    inner: RunHandle | None = None
    thread: threading.Thread | None = None
    error: TrainManagementError | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    exit_status: RunStatus | None = None


class S3LocalRunner(LocalRunner):
    """The local runner, plus S3: start() returns at once while a thread stages the job's s3:// inputs (its handle
    has no process yet, pid 0); the trainer is started by the next poll() after staging, and a LoRA bound for S3 is
    uploaded before poll() reports the trainer's end. Jobs without S3 run exactly as on LocalRunner.

    `on_started(job_id, handle)` records the trainer's process once it exists (the scheduler only saw pid 0).
    """

    def __init__(
        self,
        python: Sequence[str] | None = None,
        *,
        access: S3Access,
        on_started: Callable[[str, RunHandle], None] | None = None,
    ) -> None:
        super().__init__(python)
        self.access = access
        self.on_started = on_started
        self._s3: dict[str, _S3Run] = {}
        self._s3_lock = threading.Lock()

    def start(self, job: Job, *, resume: bool, device: str | None = None) -> RunHandle:
        """Start the trainer (no S3), or its staging thread (S3 inputs), tracking an S3 output either way."""
        config = tomlkit.parse(job.config_toml).unwrap()
        inputs = s3_inputs(config)
        run = _S3Run(job, device, resume, s3_output(job.params))
        if not inputs:
            handle = super().start(job, resume=resume, device=device)
            if run.output is not None:
                run.phase, run.inner = "training", handle
                with self._s3_lock:
                    self._s3[job.id] = run
            return handle
        (job.folder / RESULT_NAME).unlink(missing_ok=True)
        run.thread = threading.Thread(
            target=self._stage, args=(run, config), name=f"s3-stage-{job.id}", daemon=True
        )
        with self._s3_lock:
            self._s3[job.id] = run
        run.thread.start()
        return RunHandle(job.id, self.name, 0, 0, 0.0, device)

    def _stage(self, run: _S3Run, config: dict[str, Any]) -> None:
        events = EventWriter(run.job.folder)
        events.note(
            f"downloading the job's S3 inputs ({', '.join(str(u) for u in s3_inputs(config).values())})"
        )
        try:
            staged = stage_inputs(
                config, run.job.folder / INPUTS_DIR, self.access, events=events, cancelled=run.cancel.is_set
            )
            text = tomlkit.dumps(staged.values)
            (run.job.folder / CONFIG_NAME).write_text(text, encoding="utf-8")
            events.emit("downloaded", total=staged.total, fetched=staged.fetched, inputs=staged.by_key)
        except TrainManagementError as exc:
            run.error = exc
        except Exception as exc:  # a bug must still end the job with a reason, not leave it preparing
            log.exception("staging the S3 inputs of job %s failed", run.job.id)
            run.error = StorageError(f"downloading the job's S3 inputs failed: {exc!r}", "see the host's log")

    def _finish(
        self, run: _S3Run, exit_code: int, status: str, error: TrainManagementError | None
    ) -> RunStatus:
        with self._s3_lock:
            self._s3.pop(run.job.id, None)
        outcome: dict[str, Any] = {"status": status, "output": None, "step": 0, "epoch": 0, "error": None}
        if error is not None:
            outcome["error"] = {"message": str(error), "hint": error.hint}
            EventWriter(run.job.folder).emit("error", message=error.message, hint=error.hint)
        write_json_atomic(run.job.folder / RESULT_NAME, outcome)
        return RunStatus(False, exit_code)

    def poll(self, handle: RunHandle) -> RunStatus:
        """Staging: alive until done, then the trainer starts; training: LocalRunner's answer, held back while the
        LoRA is uploaded to S3."""
        with self._s3_lock:
            run = self._s3.get(handle.job_id)
        if run is None:
            return super().poll(handle)
        if run.phase == "staging":
            return self._poll_staging(run)
        if run.phase == "training" and run.inner is not None:
            status = super().poll(run.inner)
            if status.alive:
                return status
            if run.output is None or not self._completed(run, status) or run.cancel.is_set():
                with self._s3_lock:
                    self._s3.pop(run.job.id, None)
                return status
            run.phase, run.exit_status = "uploading", status
            run.thread = threading.Thread(target=self._upload, args=(run,), name=f"s3-upload-{run.job.id}")
            run.thread.daemon = True
            run.thread.start()
            return RunStatus(True)
        if run.thread is not None and run.thread.is_alive():
            return RunStatus(True)
        with self._s3_lock:
            self._s3.pop(run.job.id, None)
        return run.exit_status or RunStatus(False, None)

    def _poll_staging(self, run: _S3Run) -> RunStatus:
        if run.thread is not None and run.thread.is_alive():
            return RunStatus(True)
        if run.cancel.is_set():
            return self._finish(run, EXIT_STOPPED, "stopped", None)
        if run.error is not None:
            return self._finish(run, EXIT_FAILED, "failed", run.error)
        try:
            run.inner = super().start(run.job, resume=run.resume, device=run.device)
        except TrainManagementError as exc:
            return self._finish(run, EXIT_FAILED, "failed", exc)
        run.phase = "training"
        if self.on_started is not None:
            self.on_started(run.job.id, run.inner)
        return RunStatus(True)

    @staticmethod
    def _completed(run: _S3Run, status: RunStatus) -> bool:
        result = read_json(run.job.folder / RESULT_NAME) or {}
        return status.exit_code in (0, None) and result.get("status") == "completed"

    def _upload(self, run: _S3Run) -> None:
        from kohya_backend.jobs.delivery import final_lora

        events = EventWriter(run.job.folder)
        if run.output is None:
            raise RuntimeError(f"job {run.job.id} has no S3 output to upload to")
        try:
            upload_outputs(
                run.job,
                final_lora(run.job),
                run.output,
                self.access,
                events=events,
                cancelled=run.cancel.is_set,
            )
        except TrainManagementError as exc:
            events.emit("warning", message=f"the LoRA was not uploaded to {run.output}: {exc}")
            events.note(f"uploading to {run.output} failed: {exc}")
        except Exception as exc:
            log.exception("uploading the outputs of job %s failed", run.job.id)
            events.emit("warning", message=f"the LoRA was not uploaded to {run.output}: {exc!r}")

    def cancel(self, handle: RunHandle, *, grace_s: float) -> None:
        """Stop staging or an upload at the next block; a running trainer as LocalRunner does."""
        with self._s3_lock:
            run = self._s3.get(handle.job_id)
        if run is None:
            super().cancel(handle, grace_s=grace_s)
            return
        run.cancel.set()
        if run.phase == "training" and run.inner is not None:
            super().cancel(run.inner, grace_s=grace_s)

    def attach(self, job: Job) -> RunHandle | None:
        """LocalRunner's attach; a job bound for S3 is tracked again so its LoRA is still uploaded."""
        handle = super().attach(job)
        output = s3_output(job.params) if handle is not None else None
        if handle is not None and output is not None:
            run = _S3Run(job, handle.device, False, output, phase="training", inner=handle)
            with self._s3_lock:
                self._s3[job.id] = run
        return handle
