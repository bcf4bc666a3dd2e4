"""One SageMaker job's background thread: upload its inputs, create the training job, mirror it here, fetch its LoRA.

The scheduler never waits on AWS: it polls the session's outcome. The session keeps the job folder's contract as if
the trainer ran here: the container's event lines (read from the training job's CloudWatch log streams) go to
events.jsonl with their paths made local, every other log line to train.log, SageMaker's statuses become `cloud`
events (preparing / training / saving), and at the end model.tar.gz is unpacked into output/ and result.json
written. DIR/run.json records the training job's name before it is created and the position reached in each log
stream, so a restarted host re-attaches by name and continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tomlkit

from kohya_backend.data.archive import ArchiveError, ArchiveLimits, extract_tar
from kohya_backend.errors import TrainManagementError
from kohya_backend.job_folder import JobFolder
from kohya_backend.jobs.remote_session import remote_config
from kohya_backend.jobs.runner import (
    EVENTS_NAME,
    LOG_NAME,
    RESULT_NAME,
    RUN_NAME,
    RunStatus,
    read_json,
    write_json_atomic,
)
from kohya_backend.jobs.sagemaker_catalog import RUNNER_NAME, InstanceChoice
from kohya_backend.jobs.sagemaker_protocol import (
    CONFIG_CHANNEL,
    CONFIG_FILE,
    FOLDER_CHANNELS,
    HP_JOB_ID,
    KEY_CHANNELS,
    RESULT_FILE,
    parse_event_line,
)
from kohya_backend.jobs.sagemaker_request import (
    LOG_GROUP,
    MANIFEST_FILE,
    S3_PREFIX,
    TERMINAL,
    ChannelSource,
    JobLayout,
    SageMakerError,
    channel_digest,
    create_request,
    explain,
    failure_hint,
    is_retryable,
    object_manifest,
    our_state,
    status_message,
    training_job_name,
)
from kohya_backend.jobs.sagemaker_settings import SageMakerSettings
from kohya_backend.jobs.store import Job
from kohya_backend.jobs.transfer import LocalFile, LocalInput, collect_input
from kohya_backend.jobs.worker_protocol import INPUT_KEYS, InvalidName, validate_relpath
from kohya_backend.models.hashing import Sha256Cache, sha256_file
from kohya_backend.storage.client import DownloadCancelled, S3Client
from kohya_backend.storage.uri import S3Uri, is_s3_uri, parse_s3_uri

log = logging.getLogger(__name__)

T = TypeVar("T")
MODEL_ARCHIVE = "model.tar.gz"
MANIFEST_NAME = "manifest.json"
STAGING_DIR = ".sagemaker-model"
_GIB = 1 << 30


@dataclass(frozen=True)
class SageMakerOptions:
    """How patient a session is: DescribeTrainingJob back-off, how long AWS may stay unreachable, and caps."""

    poll_min_s: float = 2.0
    poll_max_s: float = 30.0
    lost_after_s: float = 900.0
    progress_every_s: float = 1.0
    max_model_bytes: int = 16 * _GIB


@dataclass
class AwsClients:
    """The boto3 SageMaker and CloudWatch Logs clients and the project's S3 client a session talks through."""

    sagemaker: Any
    logs: Any
    s3: S3Client


@dataclass(frozen=True)
class Channel:
    """One input channel: its S3DataSource (a prefix, or a manifest object), the files to upload for it (path,
    object, sha256, size: inputs on this machine, or the manifest), and the bytes of objects already on S3."""

    name: str
    uri: S3Uri
    files: tuple[tuple[Path, S3Uri, str, int], ...] = ()
    remote_bytes: int = 0
    data_type: str = S3_PREFIX

    @property
    def size(self) -> int:
        """Bytes of its local files, to upload."""
        return sum(f[3] for f in self.files)

    @property
    def input_bytes(self) -> int:
        """Bytes SageMaker copies onto the training volume for it."""
        return self.size + self.remote_bytes


def _local_channel(name: str, layout: JobLayout, local: LocalInput) -> Channel:
    digest = channel_digest((f.rel, f.sha256, f.size) for f in local.files)
    prefix = layout.channel(digest)
    return Channel(name, prefix, tuple((f.path, prefix.child(f.rel), f.sha256, f.size) for f in local.files))


class AwsLost(Exception):
    """SageMaker did not answer for longer than lost_after_s."""


class _Stopped(Exception):
    """The host is shutting down: leave the training job alone, a restarted host re-attaches."""


def _cloud_event(**fields: Any) -> dict[str, Any]:
    return {"kind": "cloud", "time": time.time(), **fields}


class SageMakerSession(threading.Thread):
    """Drives one job on SageMaker until its training job ends (or AWS is lost, or the host stops)."""

    def __init__(
        self,
        job: Job,
        *,
        clients: AwsClients,
        settings: SageMakerSettings,
        prefix: S3Uri,
        choice: InstanceChoice,
        options: SageMakerOptions,
        resume: bool,
    ) -> None:
        super().__init__(name=f"sagemaker-{job.id}", daemon=True)
        self.job = job
        self.clients = clients
        self.settings = settings
        self.layout = JobLayout(prefix, job.id)
        self.choice = choice
        self.options = options
        self.resume = resume
        self.cancel_requested = threading.Event()
        self.stop_requested = threading.Event()
        self.outcome: RunStatus | None = None
        self._events = job.folder / EVENTS_NAME
        self._log = job.folder / LOG_NAME
        self._cloud: dict[str, Any] = {"instance_type": choice.spec.name, "spot": choice.spot}
        self._last_progress = 0.0

    # -- the thread ---------------------------------------------------------------------------------------

    def run(self) -> None:
        """Run the job on SageMaker; whatever happens, end with an outcome (unless the host is stopping)."""
        try:
            self.outcome = self._run()
        except _Stopped:
            return
        except AwsLost as exc:
            self.outcome = RunStatus(False, None, lost=str(exc))
        except DownloadCancelled:
            self.outcome = RunStatus(False, None, lost="cancelled while uploading the inputs to S3")
        except TrainManagementError as exc:
            self.outcome = self._fail(exc.message, exc.hint)
        except Exception as exc:  # never leave the scheduler polling a dead thread
            log.exception("SageMaker session of job %s failed", self.job.id)
            self.outcome = self._fail(
                f"the SageMaker runner failed: {exc!r}", "see the host's log; resume the job"
            )

    def _run(self) -> RunStatus:
        record = read_json(self.job.folder / RUN_NAME) or {}
        if record.get("runner") != RUNNER_NAME:
            record = {"runner": RUNNER_NAME, "attempt": 0, "logs": {}}
        name = record.get("training_job") if isinstance(record.get("training_job"), str) else None
        described = self._describe(name) if name else None
        if described is not None and described["TrainingJobStatus"] in ("Failed", "Stopped") and self.resume:
            described, name = None, None  # Resume: a new training job continues from the saved state
        if described is not None and name is not None:
            return self._follow(name, record)
        if self.cancel_requested.is_set():
            return RunStatus(False, None, lost="cancelled before the training job was created")
        return self._follow(self._create(record, reuse=name), record)

    def _fail(self, message: str, hint: str | None) -> RunStatus:
        error = {"message": message, "hint": hint}
        with contextlib.suppress(OSError):
            write_json_atomic(
                self.job.folder / RESULT_NAME, {"status": "failed", "error": error, "output": None}
            )
        return RunStatus(False, 2)

    # -- calls ----------------------------------------------------------------------------------------------

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        """Call AWS, retrying network trouble and throttling with back-off until lost_after_s; other errors
        become a SageMakerError that says what to do."""
        delay, started = self.options.poll_min_s, time.monotonic()
        while True:
            if self.stop_requested.is_set():
                raise _Stopped()
            try:
                return fn()
            except Exception as exc:
                if not is_retryable(exc):
                    raise explain(exc, action) from exc
                silent = time.monotonic() - started
                if silent > self.options.lost_after_s:
                    raise AwsLost(
                        f"{action}: AWS did not answer for {silent:.0f} s ({exc}); the training job goes on: resume "
                        "the job to follow it again"
                    ) from exc
                self.stop_requested.wait(delay)
                delay = min(delay * 2, self.options.poll_max_s)

    def _describe(self, name: str) -> dict[str, Any] | None:
        """DescribeTrainingJob, or None when SageMaker has no training job of that name."""
        try:
            return self._call(
                f"reading SageMaker training job {name}",
                lambda: dict(self.clients.sagemaker.describe_training_job(TrainingJobName=name)),
            )
        except SageMakerError as exc:
            if exc.code == "ValidationException" and "not find" in exc.message.lower():
                return None
            raise

    # -- files ----------------------------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        """A line of the runner's own in train.log (the container's log lines follow as they arrive)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self._log, "a", encoding="utf-8") as handle:
            handle.write(f"=== {stamp} {text}\n")

    def _append_events(self, events: list[dict[str, Any]]) -> None:
        if events:
            with open(self._events, "a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(e) + "\n" for e in events))

    def _emit_cloud(self, **fields: Any) -> None:
        self._cloud.update(fields)
        self._append_events([_cloud_event(**self._cloud)])

    def _save_record(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.job.folder / RUN_NAME, record)

    # -- inputs ---------------------------------------------------------------------------------------------

    def _channels(self) -> list[Channel]:
        """The job's inputs as channels: s3:// values as they are, local files content-addressed under inputs/."""
        config = tomlkit.parse(self.job.config_toml).unwrap()
        hashes = Sha256Cache()
        channels = []
        try:
            for key in INPUT_KEYS:
                value = config.get(key)
                if value in (None, ""):
                    continue
                name = KEY_CHANNELS[key]
                if is_s3_uri(value):
                    channels.append(self._s3_channel(name, parse_s3_uri(value, what=key)))
                    continue
                path = self.job.folder / Path(str(value)).expanduser()
                if key == "tokenizer_cache_dir" and not path.exists():
                    continue  # the container finds a tokenizer of its own
                channels.append(_local_channel(name, self.layout, collect_input(key, path, hashes)))
        finally:
            hashes.save()
        config_file = self.job.folder / f"sagemaker-{CONFIG_FILE}"
        config_file.write_text(tomlkit.dumps(remote_config(self.job)), encoding="utf-8")
        entry = LocalFile(config_file, CONFIG_FILE, sha256_file(config_file), config_file.stat().st_size)
        channels.append(
            _local_channel(CONFIG_CHANNEL, self.layout, LocalInput(CONFIG_CHANNEL, CONFIG_FILE, (entry,)))
        )
        return channels

    def _s3_channel(self, name: str, uri: S3Uri) -> Channel:
        """An input already on S3, used where it is: one object through a manifest naming exactly it (an S3Prefix on
        its key would also copy `x.safetensors.old`), or (dataset-like) everything below a prefix."""
        if name not in FOLDER_CHANNELS:
            size = self.clients.s3.head(uri).size
            data = object_manifest(uri)
            path = self.job.folder / f"sagemaker-{name}.manifest"
            path.write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
            manifest = self.layout.channel(channel_digest([(MANIFEST_NAME, sha, len(data))])).child(
                MANIFEST_NAME
            )
            files = ((path, manifest, sha, len(data)),)
            return Channel(name, manifest, files, remote_bytes=size, data_type=MANIFEST_FILE)
        prefix = S3Uri(uri.bucket, uri.prefix())
        return Channel(
            name, prefix, remote_bytes=sum(info.size for info in self.clients.s3.list_objects(prefix))
        )

    def _upload(self, channels: list[Channel]) -> None:
        """Upload what S3 lacks (a file S3 holds with the same sha256 is not sent again), with progress events."""
        total = sum(c.size for c in channels)
        done, sent = 0, 0
        for channel in channels:
            for path, target, digest, size in channel.files:
                base = done

                def progress(now: int, _size: int, base: int = base) -> None:
                    self._upload_progress(base + now, total)

                if self.clients.s3.upload_file(
                    path,
                    target,
                    sha256=digest,
                    progress=progress,
                    cancelled=self._upload_cancelled,
                ):
                    sent += size
                done += size
        self._upload_progress(done, total, force=True)
        self._note(
            "channels: "
            + "; ".join(f"{c.name}={c.uri}" for c in channels)
            + f"; uploaded {sent} B, {total - sent} B were in S3 already"
        )

    def _upload_progress(self, done: int, total: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_progress >= self.options.progress_every_s:
            self._last_progress = now
            self._append_events(
                [
                    {
                        "kind": "s3_upload",
                        "time": time.time(),
                        "uri": str(self.layout.inputs),
                        "done": done,
                        "total": total,
                    }
                ]
            )

    def _upload_cancelled(self) -> bool:
        if self.stop_requested.is_set():
            raise _Stopped()
        return self.cancel_requested.is_set()

    # -- creating -------------------------------------------------------------------------------------------

    def _create(self, record: dict[str, Any], *, reuse: str | None) -> str:
        """Upload the inputs and create the training job; its name is recorded before it is created."""
        self._note(f"sending job {self.job.id} to SageMaker ({self.choice.label()})")
        channels = self._channels()
        self._upload(channels)
        attempt = int(record.get("attempt") or 0)
        name = reuse
        for _ in range(5):
            if name is None:
                attempt += 1
                name = training_job_name(self.job, attempt)
            record.update(
                training_job=name, attempt=attempt, logs={}, checkpoints=str(self.layout.checkpoints)
            )
            self._save_record(record)
            request = create_request(
                name=name,
                job=self.job,
                choice=self.choice,
                settings=self.settings,
                layout=self.layout,
                channels={c.name: ChannelSource(c.uri, c.data_type) for c in channels},
                input_bytes=sum(c.input_bytes for c in channels),
            )
            try:
                self._call(
                    f"creating SageMaker training job {name}",
                    functools.partial(self.clients.sagemaker.create_training_job, **request),
                )
            except SageMakerError as exc:
                if exc.code != "ResourceInUse":
                    raise
                existing = self._describe(name) or {}
                if (existing.get("HyperParameters") or {}).get(HP_JOB_ID) != self.job.id:
                    name = None  # another job's name: take the next attempt's
                    continue
            self._emit_cloud(
                training_job=name, attempt=attempt, state="preparing", phase="submitted to SageMaker"
            )
            self._note(f"created SageMaker training job {name} (attempt {attempt}); its log follows")
            return name
        raise SageMakerError(
            f"no free SageMaker training job name for job {self.job.id}",
            "submit the job again",
            code="ResourceInUse",
        )

    # -- following ------------------------------------------------------------------------------------------

    def _follow(self, name: str, record: dict[str, Any]) -> RunStatus:
        """Follow the training job to its end. AWS refusing to answer (expired credentials, a permission taken
        away) does not fail the job: the training job goes on in SageMaker, so ours is interrupted, and Resume
        follows it again."""
        self._cloud.update(training_job=name, attempt=record.get("attempt"))
        try:
            described = self._watch(name, record)
        except SageMakerError as exc:
            return RunStatus(
                False,
                None,
                lost=f"{exc.message}; SageMaker training job {name} goes on without being followed: fix this "
                f"({exc.hint}), then resume the job to follow it again, or stop it in the SageMaker console",
            )
        if described is None:
            return RunStatus(
                False, None, lost=f"SageMaker has no training job {name} any more; resume the job"
            )
        return self._finish(name, described)

    def _watch(self, name: str, record: dict[str, Any]) -> dict[str, Any] | None:
        """Poll with back-off and mirror the log until the job ends: its last description (None: it vanished)."""
        delay, seen, stop_sent = self.options.poll_min_s, None, False
        while True:
            if self.cancel_requested.is_set() and not stop_sent:
                self._stop_training_job(name)
                stop_sent = True
            described = self._describe(name)
            if described is None:
                return None
            fresh = self._mirror_logs(name, record)
            status, secondary = described["TrainingJobStatus"], str(described.get("SecondaryStatus") or "")
            if (status, secondary) != seen:
                seen = (status, secondary)
                self._status_changed(described)
                delay = self.options.poll_min_s
            if status in TERMINAL:
                self._mirror_logs(name, record)  # the last lines may arrive after the status
                return described
            if fresh:
                delay = self.options.poll_min_s
            if self.stop_requested.wait(delay):
                raise _Stopped()
            delay = min(delay * 1.5, self.options.poll_max_s)

    def _stop_training_job(self, name: str) -> None:
        try:
            self._call(
                f"stopping SageMaker training job {name}",
                lambda: self.clients.sagemaker.stop_training_job(TrainingJobName=name),
            )
        except SageMakerError as exc:
            if exc.code != "ValidationException":  # it is stopping or has ended already
                raise
        self._note(f"StopTrainingJob sent to {name}: the container saves its state and stops")

    def _status_changed(self, described: dict[str, Any]) -> None:
        status, secondary = described["TrainingJobStatus"], str(described.get("SecondaryStatus") or "")
        state, phase = our_state(secondary)
        message = status_message(described)
        fields: dict[str, Any] = {
            "status": status,
            "secondary": secondary,
            "message": message,
            "phase": phase,
        }
        if state:
            fields["state"] = state
        self._emit_cloud(**fields)
        self._cloud.pop("state", None)
        self._note(f"SageMaker: {status} / {secondary}" + (f": {message}" if message else ""))

    def _streams(self, name: str) -> list[str]:
        """The job's log streams (one per host and start: a spot restart adds one), oldest first."""
        found: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{name}/"}
            if token:
                args["nextToken"] = token
            try:
                page = self._call(
                    "listing the training job's log streams",
                    functools.partial(self.clients.logs.describe_log_streams, **args),
                )
            except SageMakerError as exc:
                if exc.code == "ResourceNotFoundException":
                    return []  # no log group yet: nothing has been logged
                raise
            found.extend(page.get("logStreams") or [])
            token = page.get("nextToken")
            if not token:
                break
        found.sort(key=lambda s: (s.get("creationTime") or 0, s.get("logStreamName") or ""))
        return [str(s["logStreamName"]) for s in found]

    def _mirror_logs(self, name: str, record: dict[str, Any]) -> bool:
        """Append new log lines of every stream to train.log / events.jsonl; True when any arrived."""
        positions: dict[str, str] = record.setdefault("logs", {})
        fresh = False
        for stream in self._streams(name):
            while True:
                args: dict[str, Any] = {
                    "logGroupName": LOG_GROUP,
                    "logStreamName": stream,
                    "startFromHead": True,
                }
                if positions.get(stream):
                    args["nextToken"] = positions[stream]
                page = self._call(
                    f"reading the log of {name}", functools.partial(self.clients.logs.get_log_events, **args)
                )
                self._write_lines([str(e.get("message") or "") for e in page.get("events") or []])
                token = page.get("nextForwardToken")
                if not page.get("events") or not token or token == positions.get(stream):
                    break
                fresh = True
                positions[stream] = token
                self._save_record(record)
        return fresh

    def _write_lines(self, messages: list[str]) -> None:
        events, lines = [], []
        for message in messages:
            for line in message.splitlines() or [""]:
                event = parse_event_line(line)
                if event is None:
                    lines.append(line + "\n")
                    continue
                for key in ("path", "output"):
                    if key in event:
                        event[key] = self._local_path(event[key])
                events.append(event)
        if lines:
            with open(self._log, "a", encoding="utf-8") as handle:
                handle.write("".join(lines))
        self._append_events(events)

    def _local_path(self, value: object) -> str | None:
        """The container's `output/<relative>` as a path in this job folder (None for anything else)."""
        try:
            rel = validate_relpath(value, what="output path")
        except InvalidName:
            return None
        return str(self.job.folder / rel) if rel.startswith("output/") else None

    # -- the end --------------------------------------------------------------------------------------------

    def _finish(self, name: str, described: dict[str, Any]) -> RunStatus:
        status, secondary = described["TrainingJobStatus"], str(described.get("SecondaryStatus") or "")
        billable = described.get("BillableTimeInSeconds")
        training = described.get("TrainingTimeInSeconds")
        if billable is not None:
            saved = (
                f", {100 * (1 - billable / training):.0f}% saved by spot"
                if self.choice.spot and training
                else ""
            )
            self._emit_cloud(billable_s=billable, training_s=training)
            self._note(f"billable time: {billable} s of {training} s training{saved}")
        checkpoints = self.layout.checkpoints
        if status == "Completed":
            return self._complete(name, described)
        if status == "Failed":
            reason = str(described.get("FailureReason") or "no reason given")
            return self._fail(f"SageMaker training job {name} failed: {reason}", failure_hint(reason))
        if self.cancel_requested.is_set():
            return RunStatus(
                False,
                None,
                lost=f"cancelled: SageMaker stopped training job {name}; its state is kept in "
                f"{checkpoints}, so resume continues from it",
            )
        why = f" ({secondary})" if secondary and secondary != "Stopped" else ""
        return RunStatus(
            False,
            None,
            lost=f"SageMaker stopped training job {name}{why}; resume starts a new training job that "
            f"continues from the state in {checkpoints}",
        )

    def _complete(self, name: str, described: dict[str, Any]) -> RunStatus:
        artifact = str((described.get("ModelArtifacts") or {}).get("S3ModelArtifacts") or "")
        if not artifact:
            return self._fail(
                f"SageMaker training job {name} completed without model artifacts", "resume the job"
            )
        uri = parse_s3_uri(artifact, what="the training job's model artifacts")
        info = self.clients.s3.head(uri)
        if info.size > self.options.max_model_bytes:
            return self._fail(
                f"{uri} is {info.size} bytes, more than the {self.options.max_model_bytes} bytes a LoRA's archive "
                "may have",
                "look at what the job wrote into /opt/ml/model",
            )
        archive = self.job.folder / MODEL_ARCHIVE
        self._emit_cloud(phase="downloading the LoRA")
        self.clients.s3.download(info, archive)
        staging = self.job.folder / STAGING_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        limits = ArchiveLimits(
            max_total_bytes=self.options.max_model_bytes, max_entry_bytes=self.options.max_model_bytes
        )
        try:
            extracted = extract_tar(archive, staging, limits=limits, label=str(uri))
        except ArchiveError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            return self._fail(exc.message, exc.hint)
        output = JobFolder(self.job.folder).output
        for rel in extracted.files:
            target = output.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging.joinpath(*rel.parts), target)
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)
        result = read_json(output / RESULT_FILE) or {}
        lora = output / f"{self.job.output_name}.safetensors"
        if result.get("status") != "completed" or not lora.is_file():
            return self._fail(
                f"{uri} holds no finished {lora.name} (the container says {result.get('status') or 'nothing'})",
                "look at the job's log; resume the job to train it again",
            )
        self._note(f"unpacked {len(extracted.files)} file(s) of {uri} into {output}")
        write_json_atomic(
            self.job.folder / RESULT_NAME,
            {
                "status": "completed",
                "output": str(lora),
                "step": result.get("step"),
                "epoch": result.get("epoch"),
                "error": None,
                "training_job": name,
                "billable_seconds": described.get("BillableTimeInSeconds"),
            },
        )
        return RunStatus(False, 0)
