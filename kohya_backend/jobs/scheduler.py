"""The scheduler: one background thread that starts queued jobs, follows their trainers and settles their state.

It claims queued jobs in submission order (FIFO) as long as a device has a free slot, starts each through its
runner, ingests the trainer's events into the job's progress, and reconciles the job's status from the real
process (alive? exit code? result.json?), so no job stays "training" after its trainer died. On start it
re-attaches to trainers that outlived a restart of the host process and marks vanished ones interrupted.
Every status change goes through JobStore.transition.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import tomlkit
from tomlkit.exceptions import ParseError

from kohya_backend.errors import ConfigError, ConfigIssue, TrainManagementError
from kohya_backend.jobs import allocation
from kohya_backend.jobs.delivery import deliver, final_lora
from kohya_backend.jobs.progress import EventTail, has_saved_state, log_tail, summarize
from kohya_backend.jobs.runner import (
    EVENTS_NAME,
    FM_TYPES,
    LOG_NAME,
    RESULT_NAME,
    RUN_NAME,
    PlacingRunner,
    RunHandle,
    Runner,
    RunStatus,
    read_json,
)
from kohya_backend.jobs.states import InvalidTransition, JobStatus
from kohya_backend.jobs.store import Job, JobNotFound, JobStore, StoreError

log = logging.getLogger(__name__)

# -- outcomes -----------------------------------------------------------------------------------------------

EXIT_COMPLETED = 0
EXIT_USER_ERROR = 2
EXIT_STOPPED = 3
_RESULT_STATUSES = ("completed", "stopped", "failed")


def outcome_of(exit_code: int | None, result: dict[str, Any] | None) -> str:
    """How a trainer ended: completed, stopped, failed (user-fixable) or crashed, from its exit code and result."""
    status = result.get("status") if result else None
    if exit_code is None:  # not our child: result.json is all we have
        return status if status in _RESULT_STATUSES else "crashed"
    if exit_code == EXIT_COMPLETED:
        return "completed" if status == "completed" else "crashed"
    if exit_code == EXIT_STOPPED:
        return "stopped"
    if exit_code == EXIT_USER_ERROR:
        return "failed"
    return "crashed"


def describe_exit(exit_code: int | None) -> str:
    """'was killed by SIGKILL', 'exited with code 1', ... for a reason text."""
    if exit_code is None:
        return "ended (its exit code is unknown: it outlived a restart of Train Management)"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"was killed by {name} (exit code {exit_code})"
    return f"exited with code {exit_code}"


def _error_text(result: dict[str, Any] | None, progress: dict[str, Any]) -> str | None:
    error = (result or {}).get("error") or progress.get("error")
    if not isinstance(error, dict) or not error.get("message"):
        return None
    message, hint = str(error["message"]), error.get("hint")
    return f"{message}\n  hint: {hint}" if hint and str(hint) not in message else message


def _with_tail(text: str, folder: Path) -> str:
    tail = log_tail(folder)
    return f"{text}. Last lines of {LOG_NAME}:\n{tail}" if tail else f"{text} ({LOG_NAME} is empty)"


# -- submission checks --------------------------------------------------------------------------------------

_BAD_NAME = re.compile(r'[\x00-\x1f/\\:*?"<>|]')
MAX_NAME_LENGTH = 150


def check_output_name(name: str) -> str:
    """Return `name` if it can be a LoRA file name in the Lora folder, else raise ConfigError saying why."""
    problem = None
    if not isinstance(name, str) or not name.strip():
        problem = "is empty"
    elif _BAD_NAME.search(name):
        problem = 'contains a path separator or a character file names cannot hold (/ \\ : * ? " < > |)'
    elif name.startswith(".") or name != name.strip() or name.endswith("."):
        problem = "starts with a dot, or starts or ends with a space or a dot"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"is longer than {MAX_NAME_LENGTH} characters"
    if problem:
        raise ConfigError(
            [
                ConfigIssue(
                    f"{name!r} {problem}", key="output_name", hint="use letters, digits, '-', '_' or '.'"
                )
            ]
        )
    return name


def config_with_output_name(config_toml: str, output_name: str) -> str:
    """The job's config with `output_name` set (added when missing); a different output_name is an error."""
    try:
        doc = tomlkit.parse(config_toml)
    except ParseError as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    f"not valid TOML: {exc}", line=exc.line, column=exc.col, hint="press Format config Params"
                )
            ]
        ) from exc
    current = doc.get("output_name")
    if current is None:
        doc["output_name"] = output_name
        return tomlkit.dumps(doc)
    if str(current) != output_name:
        raise ConfigError(
            [
                ConfigIssue(
                    f"is {str(current)!r} in config_params but the job's output name is {output_name!r}",
                    key="output_name",
                    hint="use the same name in both, or leave output_name out of config_params",
                )
            ]
        )
    return config_toml


def default_devices() -> dict[str, int]:
    """One slot per visible CUDA GPU ('cuda:0', ...), else one 'mps' slot on Apple silicon, else one 'cpu' slot."""
    from kohya_backend.jobs.devices import default_slots, detect_gpus, has_mps

    return default_slots(detect_gpus(), mps=has_mps())


# -- the scheduler ------------------------------------------------------------------------------------------

HEARTBEAT_S = 5.0
LOCK_NAME = "scheduler.lock"
DEFAULT_CANCEL_GRACE_S = 60.0
STORE_BACKOFF_MAX_S = 60.0  # the longest pause while the job database cannot be used
DEFAULT_STALL_AFTER_S = 15 * 60.0  # a training silent this long is shown as stalled
STALL_LOG_LINES = 10
_SLOW_PHASES = frozenset({"loading", "caching", "starting"})  # may be long and silent without being stuck
_RUNNING = frozenset({JobStatus.PREPARING, JobStatus.TRAINING, JobStatus.SAVING})
_PAGE = 1000


class SchedulerBusy(TrainManagementError):
    """Another live scheduler already runs the jobs of this store (home directory)."""


class StartDeferred(Exception):
    """Raised by a before-start hook for "not yet" (e.g. the WebUI is generating): the job stays queued, with
    `phase` as its progress phase, and is tried again on the next tick."""

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


@dataclass
class _Run:
    """A trainer this scheduler follows."""

    handle: RunHandle
    runner: Runner
    device: str
    signalled: bool = False
    last_heartbeat: float = field(default_factory=time.monotonic)
    last_event: float = field(default_factory=time.monotonic)  # when the trainer last reported anything
    stalled: bool = False


class Scheduler:
    """Starts queued jobs on free devices, follows their trainers, settles their state, delivers their LoRAs.

    `runners` are keyed by name; a job's `instance_type` names its runner. `devices` maps a device ('cpu',
    'cuda:0', ...) to how many jobs may train on it at once (default: 1 per GPU, or 1 on the CPU); a job may
    pin one with params["device"], or ask for N GPUs with params["gpus"] (jobs/allocation.py: it holds a slot on
    each, and no later job overtakes it for them). Finished LoRAs go to `lora_dir` (None: they stay in the job folder), then
    `on_delivered(job, paths)` runs (e.g. to refresh the WebUI's Lora list). `before_local_start(job, device)`
    runs while the job is still queued, just before the local runner launches its trainer (e.g. to unload the
    WebUI's model); StartDeferred from it keeps the job queued until a later tick, any other error fails the job.
    A training whose trainer reports nothing for `stall_after_s` (loading and caching aside) is marked stalled in
    its progress, and a cancel then stops it without the grace period.
    """

    def __init__(
        self,
        store: JobStore,
        runners: Iterable[Runner],
        *,
        lora_dir: Path | None = None,
        devices: Mapping[str, int] | None = None,
        poll_interval_s: float = 1.0,
        cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S,
        keep_epochs: bool = False,
        on_delivered: Callable[[Job, list[Path]], None] | None = None,
        before_local_start: Callable[[Job, str], None] | None = None,
        unique_names: bool = True,
        stall_after_s: float = DEFAULT_STALL_AFTER_S,
    ) -> None:
        self.store = store
        self.runners: dict[str, Runner] = {r.name: r for r in runners}
        self.devices = dict(devices) if devices is not None else default_devices()
        bad = {d: n for d, n in self.devices.items() if not isinstance(n, int) or n < 1}
        if not self.runners or not self.devices or bad:
            raise TrainManagementError(
                f"a scheduler needs at least one runner and devices with at least 1 slot each, got "
                f"runners {sorted(self.runners)} and devices {self.devices}",
                "pass runners=[LocalRunner()] and devices like {'cuda:0': 1} or {'cpu': 1}",
            )
        self.lora_dir = lora_dir
        self.poll_interval_s = poll_interval_s
        self.cancel_grace_s = cancel_grace_s
        self.stall_after_s = stall_after_s
        self.keep_epochs = keep_epochs
        self.on_delivered = on_delivered
        self.before_local_start = before_local_start
        self.unique_names = unique_names  # a remote worker holds many clients' jobs: names are theirs to keep
        self._runs: dict[str, _Run] = {}
        self._tail = EventTail()
        self._recovered = False
        self._tick_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._home_lock: IO[str] | None = None
        self._busy_warned = False
        self._store_failures = 0

    # -- commands (any thread) ------------------------------------------------------------------------------

    def submit(
        self,
        *,
        fm_type: str,
        model: str,
        dataset: str,
        instance_type: str,
        output_name: str,
        config_toml: str,
        params: dict[str, Any] | None = None,
    ) -> Job:
        """Queue a new job; refuses an output name another job already uses, an unknown runner or device."""
        params = dict(params or {})
        if fm_type not in FM_TYPES:
            raise TrainManagementError(f"unknown FM type {fm_type!r}", f"use one of: {', '.join(FM_TYPES)}")
        runner = self.runner_for(instance_type)
        if runner is None:
            raise TrainManagementError(
                f"instance type {instance_type!r} is not available here",
                f"choose one of: {', '.join(sorted(self.runners))}",
            )
        if isinstance(runner, PlacingRunner):
            runner.check_instance_type(instance_type)
        device = params.get("device")
        if device is not None and device not in self.devices:
            raise TrainManagementError(
                f"device {device!r} is not available here",
                f"choose one of: {', '.join(sorted(self.devices))}",
            )
        gpus = allocation.check_gpus_value(params.get(allocation.GPUS_PARAM, 1))
        check_gpus = getattr(runner, "check_gpus", None)
        if callable(check_gpus):  # a worker's or a SageMaker type's GPU count
            check_gpus(instance_type, gpus)
        elif not isinstance(runner, PlacingRunner):
            allocation.check_request(self.devices, gpus, device)
        config_toml = config_with_output_name(config_toml, check_output_name(output_name))
        with self._submit_lock:
            if self.unique_names and self.store.output_name_taken(output_name):
                raise TrainManagementError(
                    f"output name {output_name!r} is already used by another job",
                    "choose another output_name (each job writes its own LoRA file), or delete the old job",
                )
            job = self.store.create(
                fm_type=fm_type,
                model=model,
                dataset=dataset,
                instance_type=instance_type,
                output_name=output_name,
                config_toml=config_toml,
                params=params,
            )
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once; a running one goes to 'cancelling' and its trainer is stopped."""
        for _ in range(5):
            job = self.store.get(job_id)
            try:
                if job.status is JobStatus.QUEUED:
                    return self.store.transition(
                        job_id, JobStatus.CANCELLED, "cancelled before it started", expect={JobStatus.QUEUED}
                    )
                if job.status is JobStatus.CANCELLING:
                    return job
                if job.status in _RUNNING:
                    job = self.store.transition(
                        job_id,
                        JobStatus.CANCELLING,
                        "cancel requested: stopping the trainer",
                        expect=_RUNNING,
                    )
                    self._wake.set()
                    return job
            except InvalidTransition:
                continue  # the scheduler moved the job meanwhile: look again
            break
        # completed / failed / cancelled / interrupted: the state machine says why not.
        return self.store.transition(job_id, JobStatus.CANCELLED, "cancel requested")

    def resume(self, job_id: str) -> Job:
        """Queue an interrupted, failed or cancelled job again; its trainer continues from the newest saved state."""
        instance_type = self.store.get(job_id).instance_type
        runner = self.runner_for(instance_type)
        if isinstance(runner, PlacingRunner):  # e.g. its worker was removed: say so now, not stay queued
            runner.check_instance_type(instance_type)
        job = self.store.transition(
            job_id, JobStatus.QUEUED, "resume requested", expect=JobStatus.resumable()
        )
        # The last run's speed and ETA are not this run's: the row shows none until the trainer reports again.
        fresh = {
            "resume": True,
            "error": None,
            "phase": "queued",
            "it_per_s": None,
            "eta_s": None,
            "stalled": None,
        }
        self.store.update_progress(job_id, fresh, heartbeat=False)
        self._wake.set()
        return self.store.get(job.id)

    # -- the thread -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run tick() every poll interval in a background thread (re-attaching to running trainers first)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="train-management-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread, close the runners that follow trainers from threads of their own (remote sessions),
        then release the home. Trainers keep running; the next scheduler on this store (or this one, started
        again) re-attaches to them, and no closed runner writes into their job folders any more."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        with self._tick_lock:
            for runner in self.runners.values():
                close = getattr(runner, "close", None)
                if callable(close):
                    try:
                        close()
                    except Exception:  # the home must still be released for the next scheduler
                        log.exception("closing the %s runner failed", runner.name)
            self._runs.clear()
            self._tail = EventTail()
            self._recovered = False
            self._release_home()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.run_once())
            self._wake.clear()

    def run_once(self) -> float:
        """One tick of the thread, its trouble logged; the seconds to wait before the next one.

        A job database that cannot be used (a full disk, a read-only or broken file) is waited out with a growing
        pause, logged once per attempt without a traceback, instead of failing every poll interval.
        """
        try:
            self.tick()
        except SchedulerBusy as exc:  # another host schedules this home; take over when it goes
            if not self._busy_warned:
                log.warning("%s", exc)
                self._busy_warned = True
        except StoreError as exc:
            self._store_failures += 1
            wait = min(STORE_BACKOFF_MAX_S, self.poll_interval_s * 2**self._store_failures)
            log.warning("the job database cannot be used (%s); trying again in %.0f s", exc.message, wait)
            return wait
        except Exception:  # the thread must outlive any one bad tick; the next one tries again
            log.exception("scheduler tick failed")
        if self._store_failures:
            log.warning("the job database answers again; scheduling goes on")
            self._store_failures = 0
        return self.poll_interval_s

    def _lock_home(self) -> None:
        """Hold home/scheduler.lock: one scheduler per store; the kernel frees it when its process dies."""
        if self._home_lock is not None or os.name != "posix":
            return
        import fcntl

        handle = open(self.store.home / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 (held until stop)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise SchedulerBusy(
                f"another scheduler (process {owner}) already runs the jobs in {self.store.home}",
                "stop the other Train Management (WebUI or standalone app) using this home, or give this one "
                "its own home directory",
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self._home_lock = handle

    def _release_home(self) -> None:
        if self._home_lock is not None:
            self._home_lock.close()  # closing the file releases the flock
            self._home_lock = None

    def running(self) -> dict[str, RunHandle]:
        """The trainers this scheduler follows now, by job id."""
        return {job_id: run.handle for job_id, run in list(self._runs.items())}

    def tick(self) -> None:
        """One round: recover once, follow every trainer (events, cancel, exit), then start queued jobs."""
        with self._tick_lock:
            self._lock_home()
            if not self._recovered:
                self.recover()
            for job_id in list(self._runs):
                try:
                    self._watch(job_id)
                except JobNotFound:
                    self._runs.pop(job_id, None)  # deleted behind our back; nothing left to settle
            self._start_queued()

    # -- recovery -------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Re-attach to trainers of active jobs that outlived a restart; settle the ones that vanished."""
        self._lock_home()
        self._recovered = True
        for job in self._active_jobs():
            if job.id in self._runs:
                continue
            runner = self.runner_for(job.instance_type)
            try:
                handle = runner.attach(job) if runner is not None else None
            except TrainManagementError as exc:  # e.g. an unreadable worker list: say so, recover the others
                self._move(job, JobStatus.INTERRUPTED, f"cannot follow the job: {exc}; resume it once fixed")
                continue
            if runner is None or handle is None:
                self._settle_vanished(job)
                continue
            device = handle.device or job.params.get("device") or next(iter(self.devices))
            self._runs[job.id] = _Run(handle, runner, device)
            log.info("job %s: re-attached to its trainer (pid %s)", job.id, handle.pid)

    def _active_jobs(self) -> list[Job]:
        return list(self.store.iter_jobs(status=JobStatus.active(), page=_PAGE))

    def _settle_vanished(self, job: Job) -> None:
        unknown = self.runner_for(job.instance_type) is None
        if job.pid is None or unknown:
            why = (
                f"no runner {job.instance_type!r} is configured here"
                if unknown
                else "Train Management stopped before the trainer started"
            )
            target = JobStatus.CANCELLED if job.status is JobStatus.CANCELLING else JobStatus.INTERRUPTED
            self._move(job, target, f"{why}; resume the job to start it again")
            return
        self._settle(self._ingest(job.id), RunStatus(False, None), vanished=True)

    # -- following trainers ---------------------------------------------------------------------------------

    def _watch(self, job_id: str) -> None:
        run = self._runs[job_id]
        job = self._ingest(job_id)
        if job.status is JobStatus.CANCELLING and not run.signalled:
            # A stalled trainer would not get to saving its state: stop it at once rather than after the grace.
            stalled = run.stalled or bool(job.progress.get("stalled"))
            run.runner.cancel(run.handle, grace_s=0.0 if stalled else self.cancel_grace_s)
            run.signalled = True
        status = run.runner.poll(run.handle)
        if status.alive:
            if time.monotonic() - run.last_heartbeat >= HEARTBEAT_S:
                self.store.update_progress(job_id, {}, heartbeat=True)
                run.last_heartbeat = time.monotonic()
            self._check_stall(job, run)
            return
        job = self._ingest(job_id)  # whatever it wrote between the first read and its exit
        del self._runs[job_id]
        self._tail.forget(job_id)
        self._settle(job, status, vanished=False)

    def _ingest(self, job_id: str) -> Job:
        """Apply the trainer's new events to the job (progress, outputs, preparing->training->saving)."""
        job = self.store.get(job_id)
        events, done = self._tail.read(job_id, job.folder / EVENTS_NAME, self.store.event_offset(job_id))
        if not events:
            return job
        summary = summarize(events, list(job.progress.get("warnings") or []))
        for path in summary.outputs:
            self.store.add_output(job_id, path)
        if summary.stepped or summary.final_saved:
            job = self._advance(job, JobStatus.TRAINING, "training: first step done")
        if summary.final_saved:
            job = self._advance(job, JobStatus.SAVING, "saving: the final LoRA is written")
        run = self._runs.get(job_id)
        if run is not None:
            run.last_heartbeat = run.last_event = time.monotonic()
            # It reports again: clear the mark, also one stored before a restart (a new run is not `stalled`).
            if run.stalled or job.progress.get("stalled"):
                run.stalled = False
                summary.progress["stalled"] = None
                log.info("job %s: its trainer reports progress again", job_id)
        self.store.update_progress(job_id, summary.progress, heartbeat=True)
        self.store.record_event_offset(job_id, done)
        return self.store.get(job_id)

    def _check_stall(self, job: Job, run: _Run) -> None:
        """Mark a training whose trainer reported nothing for `stall_after_s` as stalled (progress["stalled"]:
        since when, and its log's last lines). Loading and caching (before the first step) never count."""
        if run.stalled or job.status not in (JobStatus.TRAINING, JobStatus.SAVING):
            return
        if job.progress.get("phase") in _SLOW_PHASES:
            return
        silent = time.monotonic() - run.last_event
        if silent < self.stall_after_s:
            return
        run.stalled = True
        stalled = {
            "since": time.time() - silent,
            "silent_s": round(silent),
            "log_tail": log_tail(job.folder, STALL_LOG_LINES),
        }
        self.store.update_progress(job.id, {"stalled": stalled}, heartbeat=False)
        log.warning(
            "job %s: no progress from its trainer for %.0f minutes (stalled); cancelling stops it at once",
            job.id,
            silent / 60,
        )

    def _advance(self, job: Job, target: JobStatus, reason: str) -> Job:
        """Walk preparing -> training -> saving up to `target`; other states (e.g. cancelling) stay."""
        path = [JobStatus.PREPARING, JobStatus.TRAINING, JobStatus.SAVING]
        if job.status not in path or path.index(job.status) >= path.index(target):
            return job
        for step in path[path.index(job.status) + 1 : path.index(target) + 1]:
            try:
                job = self.store.transition(job.id, step, reason, expect={path[path.index(step) - 1]})
            except InvalidTransition:
                return self.store.get(job.id)  # a cancel arrived first
        return job

    def _move(self, job: Job, target: JobStatus, reason: str) -> Job:
        try:
            return self.store.transition(job.id, target, reason)
        except InvalidTransition as exc:
            log.warning("job %s: %s", job.id, exc)
            return self.store.get(job.id)

    # -- settling a finished trainer ------------------------------------------------------------------------

    def _settle(self, job: Job, status: RunStatus, *, vanished: bool) -> None:
        if status.lost is not None:  # the runner lost its trainer (e.g. a worker stopped answering)
            target = JobStatus.CANCELLED if job.status is JobStatus.CANCELLING else JobStatus.INTERRUPTED
            self._move(job, target, status.lost)
            return
        result = read_json(job.folder / RESULT_NAME)
        outcome = outcome_of(status.exit_code, result)
        cancelling = job.status is JobStatus.CANCELLING
        step = (result or {}).get("step") or job.progress.get("step") or 0
        if outcome == "completed":
            self._complete(job)
        elif outcome == "stopped":
            resumable = has_saved_state(job.folder)
            after = "its state is saved, so resume continues from it" if resumable else "resume starts over"
            if cancelling:
                self._move(job, JobStatus.CANCELLED, f"cancelled at step {step}; {after}")
            else:
                self._move(job, JobStatus.INTERRUPTED, f"the trainer was stopped at step {step}; {after}")
        elif outcome == "failed":
            text = _error_text(result, job.progress) or _with_tail(
                f"the trainer {describe_exit(status.exit_code)}", job.folder
            )
            self._move(job, JobStatus.FAILED, text)
        elif cancelling:
            self._move(job, JobStatus.CANCELLED, f"cancelled: the trainer {describe_exit(status.exit_code)}")
        else:
            self._settle_crash(job, status, step, vanished=vanished)

    def _settle_crash(self, job: Job, status: RunStatus, step: int, *, vanished: bool) -> None:
        resumable = has_saved_state(job.folder)
        if vanished:
            what = "the trainer vanished while Train Management was not running"
        else:
            what = f"the trainer {describe_exit(status.exit_code)} at step {step}"
        if resumable or vanished:
            after = "resume continues from the saved state" if resumable else "resume starts over"
            self._move(job, JobStatus.INTERRUPTED, _with_tail(f"{what}; {after}", job.folder))
        else:
            self._move(job, JobStatus.FAILED, _with_tail(f"{what}; no state was saved", job.folder))

    def _complete(self, job: Job) -> None:
        job = self._advance(job, JobStatus.SAVING, "saving: the trainer finished")
        try:
            final = final_lora(job)
            paths = (
                deliver(job, self.lora_dir, keep_epochs=self.keep_epochs) if self.lora_dir is not None else []
            )
        except TrainManagementError as exc:
            self._move(job, JobStatus.FAILED, str(exc))
            return
        for path in [final, *paths]:
            self.store.add_output(job.id, str(path))
        where = paths[0] if paths else final
        self.store.update_progress(job.id, {"phase": "completed", "delivered": str(where)}, heartbeat=True)
        job = self._move(job, JobStatus.COMPLETED, f"LoRA written to {where}")
        if self.on_delivered is not None and job.status is JobStatus.COMPLETED:
            try:
                self.on_delivered(job, paths)
            except Exception:  # a refresh hook must never undo a finished job
                log.exception("on_delivered hook failed for job %s", job.id)

    # -- starting queued jobs -------------------------------------------------------------------------------

    def _free_slots(self) -> dict[str, int]:
        free = dict(self.devices)
        for run in self._runs.values():
            allocation.take(free, run.device)  # every GPU of a multi-GPU job counts
        return {d: free[d] for d in self.devices}

    def runner_for(self, instance_type: str) -> Runner | None:
        """The runner of an instance type: a runner's name, or `name:target` for a runner that places jobs."""
        runner = self.runners.get(instance_type)
        if runner is None:
            base = self.runners.get(instance_type.partition(":")[0])
            runner = base if isinstance(base, PlacingRunner) else None
        return runner

    def _may_place(self) -> bool:
        """Whether a placing runner (remote workers) could start or settle a queued job now (no store query)."""
        for runner in self.runners.values():
            try:
                if isinstance(runner, PlacingRunner) and runner.may_place():
                    return True
            except Exception:  # a runner's trouble must not stop the local jobs
                log.exception("asking the %s runner for room failed", runner.name)
        return False

    def _start_queued(self) -> None:
        free = self._free_slots()
        if not any(n > 0 for n in free.values()) and not self._may_place():
            return  # nothing can start: the queue is not even listed
        queued, _total = self.store.list(status=[JobStatus.QUEUED], limit=_PAGE, newest_first=False)
        for job in queued:
            runner = self.runner_for(job.instance_type)
            if isinstance(runner, PlacingRunner):  # it has machines of its own (remote workers)
                try:
                    placed = runner.place(job)
                except Exception:  # one runner's trouble must not keep the jobs behind it queued
                    log.exception("placing job %s failed", job.id)
                    continue
                if placed is not None:
                    self._launch(job, placed)
                continue
            if not any(n > 0 for n in free.values()):
                continue
            device = self._device_for(job, free)
            if device is None:
                if allocation.gpus_of(job.params) > 1:
                    free = {
                        d: 0 for d in free
                    }  # a multi-GPU job waits for GPUs: no later local job takes them
                continue
            try:
                if self._launch(job, device):
                    allocation.take(free, device)
            except StartDeferred:
                for member in allocation.members(device):
                    free[member] = 0  # first in, first out: no later job takes the slots this one waits for

    def _device_for(self, job: Job, free: dict[str, int]) -> str | None:
        return allocation.choose(free, allocation.gpus_of(job.params), job.params.get("device"))

    def _launch(self, job: Job, device: str) -> bool:
        runner = self.runner_for(job.instance_type)
        local = not isinstance(runner, PlacingRunner)
        if runner is None or (local and not allocation.known(job.params.get("device", device), self.devices)):
            problem = (
                f"instance type {job.instance_type!r} is not available here"
                if runner is None
                else f"device {job.params.get('device')!r} is not available here"
            )
            self._move(job, JobStatus.FAILED, f"{problem}; submit the job again with one that is")
            return False
        try:
            if self.before_local_start is not None and runner.name == "local":
                self.before_local_start(job, device)  # while still queued: StartDeferred keeps it so
        except StartDeferred as later:
            if job.progress.get("phase") != later.phase:
                self.store.update_progress(job.id, {"phase": later.phase}, heartbeat=False)
            raise
        except Exception as exc:
            return self._start_failed(job, exc)
        try:
            job = self.store.transition(
                job.id, JobStatus.PREPARING, f"starting the trainer on {device}", expect={JobStatus.QUEUED}
            )
        except InvalidTransition:
            return False  # cancelled meanwhile
        resume = bool(job.progress.get("resume")) or (job.folder / RUN_NAME).exists()
        try:
            handle = runner.start(job, resume=resume, device=device)
        except Exception as exc:
            return self._start_failed(job, exc)
        if handle.pid > 0:  # remote trainers have no process on this host
            self.store.set_process(job.id, handle.pid, handle.pgid)
        self.store.update_progress(job.id, {"phase": "starting", "device": device}, heartbeat=True)
        self._runs[job.id] = _Run(handle, runner, device)
        return True

    def _start_failed(self, job: Job, exc: Exception) -> bool:
        """Fail a job whose start went wrong: it must not stay queued or 'preparing' without a process."""
        text = str(exc) if isinstance(exc, TrainManagementError) else f"could not start the trainer: {exc!r}"
        self._move(job, JobStatus.FAILED, text)
        if not isinstance(exc, (TrainManagementError, OSError)):
            raise exc
        return False
