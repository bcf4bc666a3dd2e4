"""The remote runner: trains jobs on registered GPU workers through the scheduler's Runner interface.

Instance types: `worker` (the pool: the first free worker that fits, VRAM when known) and `worker:<name>` (that
worker). start() returns at once; a RemoteSession thread per job sends its files, submits it and mirrors it into
the job folder, so the scheduler's event ingestion, progress, settling and delivery work as for local jobs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from kohya_backend.errors import InUse, TrainManagementError
from kohya_backend.jobs.pool import WorkerPool, WorkerState
from kohya_backend.jobs.registry import WorkerEntry, WorkerNotFound, WorkerRegistry
from kohya_backend.jobs.remote_cleanup import PENDING_NAME, PendingDeletes, remote_copies
from kohya_backend.jobs.remote_session import RUNNER_NAME, RemoteOptions, RemoteSession
from kohya_backend.jobs.runner import (
    RESULT_NAME,
    RUN_NAME,
    RunHandle,
    RunStatus,
    read_json,
    write_json_atomic,
)
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job, JobStore
from kohya_backend.jobs.worker_protocol import plain_http_warning

log = logging.getLogger(__name__)

POOL = RUNNER_NAME
PREFIX = f"{RUNNER_NAME}:"


def _target(instance_type: str) -> str | None:
    """The worker an instance type names, or None for the pool (any free worker)."""
    if instance_type == POOL:
        return None
    if instance_type.startswith(PREFIX) and instance_type[len(PREFIX) :]:
        return instance_type[len(PREFIX) :]
    raise TrainManagementError(
        f"instance type {instance_type!r} is not a worker",
        f"use '{POOL}' (any free worker) or '{PREFIX}<name>'",
    )


def _device(worker: str) -> str:
    return f"{PREFIX}{worker}"


class WorkerBusy(InUse):
    """Queued or running jobs still use this worker, so it cannot be removed; `job_ids` lists them."""


def jobs_using_worker(store: JobStore, name: str) -> list[str]:
    """Ids of the queued and running jobs aimed at worker `name`, or (sent through the pool) running there."""
    found: list[str] = []
    for job in store.iter_jobs(status=JobStatus.busy()):
        running_there = job.instance_type == POOL and job.status is not JobStatus.QUEUED
        if job.instance_type == _device(name) or (
            running_there and (read_json(job.folder / RUN_NAME) or {}).get("worker") == name
        ):
            found.append(job.id)
    return found


def remove_worker(registry: WorkerRegistry, store: JobStore, name: str) -> None:
    """Forget worker `name`; WorkerBusy (with the job ids) while queued or running jobs use it."""
    registry.require(name)
    busy = jobs_using_worker(store, name)
    if busy:
        shown = ", ".join(busy[:10]) + (f" and {len(busy) - 10} more" if len(busy) > 10 else "")
        raise WorkerBusy(
            f"worker {name!r} is still used by {len(busy)} queued or running job(s): {shown}",
            "cancel them (or wait until they end), then remove the worker",
            busy,
        )
    registry.remove(name)


class RemoteRunner:
    """Runs jobs on remote workers (see the module doc); one RemoteSession thread per running job."""

    name = RUNNER_NAME

    def __init__(
        self,
        registry: WorkerRegistry,
        *,
        pool: WorkerPool | None = None,
        options: RemoteOptions | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool or WorkerPool(registry)
        self.options = options or RemoteOptions()
        self._sessions: dict[str, RemoteSession] = {}
        self._lock = threading.Lock()
        self.pending_deletes = PendingDeletes(registry.path.parent)
        self.pool.after_refresh = self._delete_on_answering
        self._last_warning = ""
        self._states_seen: frozenset[tuple[str, str]] | None = None

    @classmethod
    def for_home(
        cls, home_root: Path, *, refresh_s: float | None = None, options: RemoteOptions | None = None
    ) -> RemoteRunner:
        """The runner of a home: its workers.json registry (files are hashed through models.hashing's cache)."""
        registry = WorkerRegistry(Path(home_root))
        pool = WorkerPool(registry, refresh_s=refresh_s) if refresh_s is not None else WorkerPool(registry)
        return cls(registry, pool=pool, options=options)

    # -- choosing a worker --------------------------------------------------------------------------------

    def check_instance_type(self, instance_type: str) -> None:
        """Refuse an instance type naming no registered worker (or the pool while none is registered)."""
        target = _target(instance_type)
        if target is not None:
            if self.registry.get(target) is None:
                known = [POOL, *(_device(e.name) for e in self.registry.entries())]
                raise WorkerNotFound(
                    f"instance type {instance_type!r}: no worker named {target!r} is registered (never added, or removed "
                    "or renamed since)",
                    f"add it (`workers add URL --name {target}`), or choose one of: " + ", ".join(known),
                    web_hint=f"open *Remote GPU workers* and add the worker with the name {target!r}, or choose "
                    "another Training Instance Type",
                )
            state = self.pool.states().get(target)
            if state is not None and state.state == "unauthorized":
                raise TrainManagementError(
                    f"worker {target!r} refused its token at the last check ({state.error})",
                    "add it again with the token from the worker's token file (`workers add URL --token-file F`)",
                    web_hint=f"open *Remote GPU workers*, paste {target}'s URL and the token from its token file, "
                    "and press **Add worker**",
                )
        elif not self.registry.entries():
            raise TrainManagementError(
                "no remote worker is registered",
                "add one (`workers add URL`, or --train-worker)",
                web_hint="open *Remote GPU workers*, paste a worker's URL and token, and press **Add worker**",
            )

    def check_gpus(self, instance_type: str, gpus: int) -> None:
        """Refuse a job asking for more GPUs than its worker reported (for the pool: than any worker reported);
        a worker not heard from yet, or one without GPUs (its CPU runs the processes), is given the benefit."""
        self.check_instance_type(instance_type)
        if gpus == 1:
            return
        target = _target(instance_type)
        states = self.pool.states()
        named = [states[target]] if target is not None and target in states else list(states.values())
        if not named or any(not s.info or s.has_gpus_for(gpus) for s in named):
            return
        best = max(s.gpu_count() for s in named)
        where = f"worker {target!r} has" if target is not None else "the largest registered worker has"
        raise TrainManagementError(
            f"the job asks for {gpus} GPUs, but {where} {best}",
            f"ask for at most {best} GPUs per job, or add a worker with {gpus} GPUs",
        )

    def _own_active(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for session in self._sessions.values():
                if session.outcome is None and session.is_alive():
                    counts[session.worker.name] = counts.get(session.worker.name, 0) + 1
        return counts

    def place(self, job: Job) -> str | None:
        """Where a queued job starts now: its worker, or for the pool its previous worker (its saved state is
        there) while that one answers, else the first free worker that fits; None keeps it queued."""
        try:
            target = _target(job.instance_type)
            states = self.pool.states()
        except TrainManagementError as exc:  # e.g. workers.json cannot be read: wait (instance types say why)
            self._warn_once(str(exc))
            return None
        own = self._own_active()

        def fits(name: str) -> bool:
            return states[name].can_take(job.fm_type, job.params, own.get(name, 0))

        if target is not None:
            gone = target not in states
            refused = not gone and states[target].state == "unauthorized"
            # A removed worker or a refused token fails the job (start says why), rather than keeping it queued.
            return _device(target) if gone or refused or fits(target) else None
        previous = (read_json(job.folder / RUN_NAME) or {}).get("worker")
        if isinstance(previous, str) and previous in states and states[previous].state in ("online", "busy"):
            return _device(previous) if fits(previous) else None
        for name in states:
            if fits(name):
                return _device(name)
        return None

    def may_place(self) -> bool:
        """From the pool's cache: a worker answers with a free slot, or the workers or their states changed since
        the last look (jobs aimed at a removed worker, or at one that now refuses its token, then fail)."""
        try:
            states = self.pool.states()
        except TrainManagementError as exc:
            self._warn_once(str(exc))
            return False
        seen = frozenset((name, state.state) for name, state in states.items())
        if seen != self._states_seen:
            self._states_seen = seen
            return True
        own = self._own_active()
        return any(
            state.state in ("online", "busy") and state.free_slots(own.get(name, 0)) > 0
            for name, state in states.items()
        )

    # -- the Runner interface -----------------------------------------------------------------------------

    def start(self, job: Job, *, resume: bool, device: str | None = None) -> RunHandle:
        """Start a session for `job` on the worker `device` names ('worker:<name>'); returns at once."""
        if device is None or not device.startswith(PREFIX):
            raise TrainManagementError(
                f"job {job.id}: no worker chosen (device {device!r})", "resume the job"
            )
        entry = self._registered(device[len(PREFIX) :])
        (job.folder / RESULT_NAME).unlink(missing_ok=True)  # a previous run's outcome is not this one's
        record = read_json(job.folder / RUN_NAME) or {}
        if record.get("runner") != RUNNER_NAME:
            record = {"runner": RUNNER_NAME, "remote": {}}
        record["worker"] = entry.name
        write_json_atomic(job.folder / RUN_NAME, record)
        return self._launch(job, entry.name, resume=resume)

    def _registered(self, name: str) -> WorkerEntry:
        """The worker `name`; WorkerNotFound saying what to do when it was removed (or renamed) meanwhile."""
        entry = self.registry.get(name)
        if entry is None:
            known = [POOL, *(_device(e.name) for e in self.registry.entries())]
            raise WorkerNotFound(
                f"worker {name!r} is not registered any more (removed, or added again under another name)",
                f"add it again as {name!r} (`workers add URL --name {name}`), or submit the job again to one of: "
                + ", ".join(known),
                web_hint=f"open *Remote GPU workers* and add it again with the name {name!r}, or choose another "
                "Training Instance Type and submit the job again",
            )
        return entry

    def _launch(self, job: Job, worker: str, *, resume: bool) -> RunHandle:
        session = RemoteSession(
            job,
            self.registry.require(worker),
            client_id=self.registry.client_id(),
            options=self.options,
            resume=resume,
        )
        with self._lock:
            old = self._sessions.get(job.id)
            if old is not None:
                old.stop_requested.set()
            self._sessions[job.id] = session
        session.start()
        return RunHandle(job.id, self.name, 0, 0, 0.0, _device(worker))

    def poll(self, handle: RunHandle) -> RunStatus:
        """Alive while the session runs; then its outcome (exit code 0/2, or `lost` with the reason)."""
        with self._lock:
            session = self._sessions.get(handle.job_id)
        if session is None:
            return RunStatus(False, None, lost="the remote runner lost track of this job; resume it")
        if session.outcome is None:
            if session.is_alive():
                return RunStatus(True)
            return RunStatus(False, None, lost="the remote runner stopped following this job; resume it")
        return session.outcome

    def cancel(self, handle: RunHandle, *, grace_s: float) -> None:
        """Pass the cancel to the worker (the session sends it; the worker's own grace period applies)."""
        with self._lock:
            session = self._sessions.get(handle.job_id)
        if session is not None:
            session.cancel_requested.set()

    def attach(self, job: Job) -> RunHandle | None:
        """After a restart: follow the job again on the worker run.json names (None when it never got one)."""
        record = read_json(job.folder / RUN_NAME) or {}
        worker = record.get("worker")
        if record.get("runner") != RUNNER_NAME or not isinstance(worker, str):
            return None
        self._registered(worker)  # a worker removed meanwhile: the scheduler interrupts the job with why
        return self._launch(job, worker, resume=False)

    def close(self) -> None:
        """Stop the monitor and every session (remote jobs go on; a new runner re-attaches to them)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.stop_requested.set()
        for session in sessions:  # each ends after its current request, before writing its answer
            session.join(self.options.events_wait_s + 10)
        self.pool.close()

    # -- deleted jobs -------------------------------------------------------------------------------------

    def delete_job(self, store: JobStore, job: Job, *, wait: bool = False) -> str | None:
        """Delete `job` here and its copies on the workers its run.json names; a note says how (None: no copies).

        The copies are recorded (HOME/worker-deletes.json) before the job goes, so a crash right after still
        deletes them, and taken off again when the job stays; a record that cannot be written does not stop the
        deletion (the note names the copies left behind). The pool's monitor deletes them as soon as each worker
        answers, or this call at once with `wait` (the CLI).
        """
        copies = remote_copies(read_json(job.folder / RUN_NAME))
        if not copies:
            store.delete(job.id)
            return None
        try:
            self.pending_deletes.add(copies)
        except OSError as exc:
            store.delete(job.id)
            where = ", ".join(f"job {i} on worker {w}" for w, i in sorted(copies.items()))
            log.warning("job %s deleted, but its copies (%s) could not be recorded: %s", job.id, where, exc)
            return (
                f"its copies ({where}) could not be recorded for deletion ({exc}): delete them there by hand"
            )
        try:
            store.delete(job.id)
        except TrainManagementError:
            with contextlib.suppress(TrainManagementError, OSError):
                store.get(job.id)  # still here (e.g. resumed meanwhile): its copies stay with it
                self.pending_deletes.discard(copies)
            raise
        return self._forget(copies, wait=wait)

    def _forget(self, copies: dict[str, str], *, wait: bool) -> str | None:
        names = ", ".join(sorted(copies))
        if not wait:
            self.pool.refresh_soon()
            return f"its copy on worker {names} is deleted there in the background (retried until it answers)"
        left = self.pending_deletes.flush(self.registry, self.pool.client, copies)
        waiting = sorted(w for w, job_id in copies.items() if job_id in left.get(w, []))
        done = sorted(w for w in copies if w not in waiting)
        notes = [f"deleted its copy on worker {', '.join(done)}"] if done else []
        if waiting:
            notes.append(
                f"worker {', '.join(waiting)} did not answer (or still ran the job, now cancelled there): its copy "
                f"is deleted later, while Train Management runs (pending in {PENDING_NAME})"
            )
        return "; ".join(notes)

    def _delete_on_answering(self, states: dict[str, WorkerState]) -> None:
        """The monitor's round: delete pending copies on the workers that answered it."""
        pending = self.pending_deletes.pending()
        answering = [n for n in pending if n in states and states[n].state in ("online", "busy")]
        if answering:
            self.pending_deletes.flush(self.registry, self.pool.client, answering)

    # -- listings -----------------------------------------------------------------------------------------

    def _warn_once(self, text: str) -> None:
        if text != self._last_warning:
            self._last_warning = text
            log.warning("remote workers: %s", text)

    def instance_types(self) -> list[dict[str, Any]]:
        """The pool and each registered worker, with its GPU and state, for the Training Instance Type list.

        An unreadable worker list is one entry with its error (listings and local jobs go on without workers).
        """
        try:
            states = self.pool.states()
        except TrainManagementError as exc:
            return [
                {
                    "name": POOL,
                    "kind": "pool",
                    "label": "remote workers: the worker list cannot be read",
                    "state": "error",
                    "error": str(exc),
                    "devices": [],
                }
            ]
        if not states:
            return []
        answering = [s for s in states.values() if s.state in ("online", "busy")]
        items: list[dict[str, Any]] = [
            {
                "name": POOL,
                "kind": "pool",
                "label": f"any free worker ({len(answering)} of {len(states)} answering)",
                "state": "online" if answering else "offline",
                "devices": [_device(n) for n in states],
            }
        ]
        urls = {e.name: e.url for e in self.registry.entries()}
        for name, state in states.items():
            warning = plain_http_warning(urls[name]) if name in urls else None
            label = f"worker {name}: {state.gpu_label()}, {state.state}"
            items.append(
                {
                    **state.public(),
                    "name": _device(name),
                    "worker": name,
                    "kind": "worker",
                    "label": f"{label}, token over plain http!" if warning else label,
                    "warning": warning,
                    "cuda": state.has_cuda(),
                    "devices": [_device(name)],
                }
            )
        return items

    def workers(self) -> list[dict[str, Any]]:
        """Every registered worker (no tokens) with its last known state and running jobs from this host."""
        states = self.pool.states()
        own = self._own_active()
        out = []
        for entry in self.registry.entries():
            state = states[entry.name].public() if entry.name in states else {}
            out.append(
                {
                    **state,
                    **entry.public(),
                    "instance_type": _device(entry.name),
                    "jobs_here": own.get(entry.name, 0),
                }
            )
        return out
