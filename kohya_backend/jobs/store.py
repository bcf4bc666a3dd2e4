"""The persistent job store: one SQLite database (WAL) plus one folder per job under the home directory.

Every status change goes through `JobStore.transition`, a compare-and-set inside `BEGIN IMMEDIATE`,
so several threads or processes may share one store without losing updates.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.fileio import atomic_write
from kohya_backend.job_folder import CONFIG_NAME as CONFIG_NAME
from kohya_backend.jobs.states import INITIAL_STATUS, JobStatus, check_transition

DB_NAME = "jobs.sqlite3"
JOBS_DIR = "jobs"
JOB_ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")
_BUSY_TIMEOUT_MS = 15_000
_MAX_PAGE = 1000
_JOB_COLUMNS = (
    "id, status, created_at, updated_at, fm_type, model, dataset, instance_type, output_name, "
    "config_toml, params, progress, reason, pid, pgid, heartbeat_at"
)


class JobNotFound(TrainManagementError):
    """No job with this id exists in the store."""

    http_status = 404


class InvalidJobId(JobNotFound):
    """A string that cannot be a job id (rejected before it reaches the filesystem or the database)."""

    http_status = 400


class JobActive(TrainManagementError):
    """The job still has, or may soon have, a process working on it, so it cannot be deleted."""

    http_status = 409


class StoreError(TrainManagementError):
    """The job database (or a job folder) cannot be opened, migrated or written: the server's trouble, not the
    request's, so the API answers 503 and a client may try again once it is fixed."""

    http_status = 503


def _folder_error(exc: OSError, folder: Path) -> StoreError:
    """A job folder that cannot be written, said plainly (a full disk names the folder)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left on device in {folder}", "free space on that disk, then try again")
    return StoreError(f"cannot write the job folder {folder}: {exc.strerror or exc}", _DB_HINT)


def _migration_1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            fm_type TEXT NOT NULL,
            model TEXT NOT NULL,
            dataset TEXT NOT NULL,
            instance_type TEXT NOT NULL,
            output_name TEXT NOT NULL,
            config_toml TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            progress TEXT NOT NULL DEFAULT '{}',
            reason TEXT,
            pid INTEGER,
            pgid INTEGER,
            heartbeat_at REAL,
            events_offset INTEGER NOT NULL DEFAULT 0
        )"""
    )
    conn.execute("CREATE INDEX jobs_status ON jobs(status, seq)")
    conn.execute("CREATE INDEX jobs_output_name ON jobs(output_name)")
    conn.execute(
        """CREATE TABLE transitions (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            from_status TEXT,
            to_status TEXT NOT NULL,
            at REAL NOT NULL,
            reason TEXT NOT NULL
        )"""
    )
    conn.execute("CREATE INDEX transitions_job ON transitions(job_id, seq)")
    conn.execute(
        """CREATE TABLE outputs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            at REAL NOT NULL,
            UNIQUE (job_id, path)
        )"""
    )


# Migration i (1-based) brings the database from user_version i-1 to i. Append only; never edit one
# that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migration_1,)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Job:
    """A snapshot of one job row; `folder` holds its config, logs, events and outputs."""

    id: str
    status: JobStatus
    created_at: float
    updated_at: float
    fm_type: str
    model: str
    dataset: str
    instance_type: str
    output_name: str
    config_toml: str
    params: dict[str, Any]
    progress: dict[str, Any]
    reason: str | None
    pid: int | None
    pgid: int | None
    heartbeat_at: float | None
    outputs: list[str]
    folder: Path


@dataclass(frozen=True)
class Transition:
    """One stored status change; `from_status` is None for the submission."""

    job_id: str
    from_status: JobStatus | None
    to_status: JobStatus
    at: float
    reason: str


def validate_job_id(job_id: str) -> str:
    """Return `job_id` if it has the store's id shape, else raise InvalidJobId (so '../x' never reaches a path)."""
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise InvalidJobId(
            f"{job_id!r} is not a valid job id",
            "job ids look like 20261125-153012-ab12cd; copy it from the job list",
        )
    return job_id


def new_job_id(now: float | None = None) -> str:
    """A time-ordered id: UTC date and time of submission plus 6 random hex digits."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(3)}"


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"job {job_id} does not exist", "it may have been deleted; reload the job list")


def _check_json_object(name: str, value: object) -> str:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    return json.dumps(value, sort_keys=True)


class JobStore:
    """Jobs, their transitions, outputs and event offsets, in `home`/jobs.sqlite3 with folders in `home`/jobs/."""

    SCHEMA_VERSION = SCHEMA_VERSION

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.db_path = self.home / DB_NAME
        self.jobs_root = self.home / JOBS_DIR
        self.jobs_root.mkdir(parents=True, exist_ok=True)
        self._migrate()

    # -- connections and transactions -------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One short-lived connection per operation: safe across threads and forked processes."""
        try:
            conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open job database {self.db_path}: {exc}", _DB_HINT) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            # In WAL mode NORMAL survives a killed process; only a power cut may lose the last commits.
            conn.execute("PRAGMA synchronous = NORMAL")
            yield conn
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"job database {self.db_path} failed: {exc}", _DB_HINT) from exc
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE), so read-then-write is one atomic step."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees the same snapshot."""
        with self._connect() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def _migrate(self) -> None:
        """Bring the database to SCHEMA_VERSION, one migration per transaction; refuse a newer one."""
        with self._connect() as conn:
            # WAL lets readers (the UI) run while a writer commits; it is a property of the file.
            conn.execute("PRAGMA journal_mode = WAL")
        while True:
            with self._write() as tx:
                # Read inside the write lock: of several processes opening a fresh store, one migrates.
                version = int(tx.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"job database {self.db_path} has schema version {version}, but this version "
                        f"of Train Management knows only up to {SCHEMA_VERSION}",
                        "update the extension, or point it at another home directory",
                    )
                if version == SCHEMA_VERSION:
                    return
                MIGRATIONS[version](tx)
                tx.execute(f"PRAGMA user_version = {version + 1}")

    # -- reading ----------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        """The folder of a job (config, logs, events, samples, outputs); the id is validated first."""
        return self.jobs_root / validate_job_id(job_id)

    def _row_to_job(self, row: tuple[Any, ...], outputs: builtins.list[str]) -> Job:
        (jid, status, created, updated, fm_type, model, dataset, instance, output_name, config,
         params, progress, reason, pid, pgid, heartbeat) = row  # fmt: skip
        return Job(
            id=jid,
            status=JobStatus(status),
            created_at=created,
            updated_at=updated,
            fm_type=fm_type,
            model=model,
            dataset=dataset,
            instance_type=instance,
            output_name=output_name,
            config_toml=config,
            params=json.loads(params),
            progress=json.loads(progress),
            reason=reason,
            pid=pid,
            pgid=pgid,
            heartbeat_at=heartbeat,
            outputs=outputs,
            folder=self.jobs_root / jid,
        )

    def _outputs(self, conn: sqlite3.Connection, ids: builtins.list[str]) -> dict[str, builtins.list[str]]:
        found: dict[str, builtins.list[str]] = {jid: [] for jid in ids}
        if ids:
            marks = ",".join("?" * len(ids))
            rows = conn.execute(
                f"SELECT job_id, path FROM outputs WHERE job_id IN ({marks}) ORDER BY seq", ids
            )
            for jid, path in rows:
                found[jid].append(path)
        return found

    def _get(self, conn: sqlite3.Connection, job_id: str) -> Job:
        validate_job_id(job_id)
        row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise _not_found(job_id)
        return self._row_to_job(row, self._outputs(conn, [job_id])[job_id])

    def get(self, job_id: str) -> Job:
        """The job with this id; JobNotFound if there is none, InvalidJobId if the id is malformed."""
        validate_job_id(job_id)
        with self._read() as conn:
            return self._get(conn, job_id)

    def list(
        self,
        *,
        status: Iterable[JobStatus] | None = None,
        offset: int = 0,
        limit: int = 50,
        newest_first: bool = True,
    ) -> tuple[builtins.list[Job], int]:
        """One page of jobs (optionally only those in `status`) and the total count matching the filter."""
        if offset < 0 or not 1 <= limit <= _MAX_PAGE:
            raise TrainManagementError(
                f"bad page: offset={offset}, limit={limit}",
                f"offset must be >= 0 and limit between 1 and {_MAX_PAGE}",
            )
        where = ""
        args: builtins.list[str] = []
        if status is not None:
            # A JobStatus is a str, so iterating a bare one would yield its letters.
            statuses = [status] if isinstance(status, JobStatus) else status
            wanted = sorted({JobStatus(s).value for s in statuses})
            where = f"WHERE status IN ({','.join('?' * len(wanted))})" if wanted else "WHERE 0"
            args = [*wanted]
        order = "DESC" if newest_first else "ASC"
        with self._read() as conn:
            total = int(conn.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0])
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY seq {order} LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            outputs = self._outputs(conn, [r[0] for r in rows])
        return [self._row_to_job(r, outputs[r[0]]) for r in rows], total

    def iter_jobs(self, *, status: Iterable[JobStatus] | None = None, page: int = _MAX_PAGE) -> Iterator[Job]:
        """Every job (optionally only those in `status`), oldest first, read `page` jobs at a time."""
        offset = 0
        while True:
            jobs, total = self.list(status=status, offset=offset, limit=page, newest_first=False)
            yield from jobs
            offset += len(jobs)
            if not jobs or offset >= total:
                return

    def transitions(self, job_id: str) -> builtins.list[Transition]:
        """Every status change of the job, oldest first, starting with its submission."""
        validate_job_id(job_id)
        with self._read() as conn:
            self._require(conn, job_id)
            rows = conn.execute(
                "SELECT job_id, from_status, to_status, at, reason FROM transitions "
                "WHERE job_id = ? ORDER BY seq",
                (job_id,),
            ).fetchall()
        return [
            Transition(jid, JobStatus(old) if old is not None else None, JobStatus(new), at, reason)
            for jid, old, new, at, reason in rows
        ]

    def output_name_taken(self, output_name: str) -> bool:
        """True if any stored job (whatever its state) already writes or wrote a LoRA of this name."""
        with self._read() as conn:
            row = conn.execute("SELECT 1 FROM jobs WHERE output_name = ? LIMIT 1", (output_name,)).fetchone()
        return row is not None

    def next_queued(self) -> Job | None:
        """The oldest queued job (FIFO by submission order), or None; claim it with transition(expect=...)."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = ? ORDER BY seq LIMIT 1",
                (JobStatus.QUEUED.value,),
            ).fetchone()
            if row is None:
                return None
            return self._row_to_job(row, self._outputs(conn, [row[0]])[row[0]])

    def event_offset(self, job_id: str) -> int:
        """How many lines of the job's events.jsonl have been ingested already."""
        validate_job_id(job_id)
        with self._read() as conn:
            row = conn.execute("SELECT events_offset FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise _not_found(job_id)
        return int(row[0])

    # -- writing ----------------------------------------------------------------------------------

    def create(
        self,
        *,
        fm_type: str,
        model: str,
        dataset: str,
        instance_type: str,
        output_name: str,
        config_toml: str,
        params: dict[str, Any],
    ) -> Job:
        """Store a new queued job and its folder with config.toml; the first transition is None -> queued."""
        params_json = _check_json_object("params", params)
        try:
            job_id, folder = self._new_folder()
        except OSError as exc:
            raise _folder_error(exc, self.jobs_root) from exc
        try:
            try:
                atomic_write(folder / CONFIG_NAME, config_toml)
            except OSError as exc:
                raise _folder_error(exc, folder) from exc
            now = time.time()
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO jobs (id, status, created_at, updated_at, fm_type, model, dataset, "
                    "instance_type, output_name, config_toml, params, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, INITIAL_STATUS.value, now, now, fm_type, model, dataset, instance_type,
                     output_name, config_toml, params_json, "submitted"),
                )  # fmt: skip
                self._log_transition(conn, job_id, None, INITIAL_STATUS, "submitted", now)
                return self._get(conn, job_id)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _new_folder(self) -> tuple[str, Path]:
        """Pick a fresh id and create its folder; the exclusive mkdir is what makes the id unique."""
        for _ in range(100):
            job_id = new_job_id()
            folder = self.jobs_root / job_id
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            return job_id, folder
        raise StoreError(
            f"could not create a new job folder under {self.jobs_root}: 100 random ids were all taken",
            "check that nothing else writes folders named like job ids there",
        )

    def transition(
        self,
        job_id: str,
        new: JobStatus,
        reason: str,
        *,
        expect: Iterable[JobStatus] | None = None,
    ) -> Job:
        """Change the job's status if ALLOWED_TRANSITIONS (and `expect`) permit; the only way status changes."""
        validate_job_id(job_id)
        new = JobStatus(new)
        expected = frozenset(JobStatus(s) for s in expect) if expect is not None else None
        with self._write() as conn:
            current = self._require(conn, job_id)
            check_transition(job_id, current, new, expected)
            now = time.time()
            # A queued job has no process; forget the previous run's so liveness checks skip it.
            clear = ", pid = NULL, pgid = NULL" if new is JobStatus.QUEUED else ""
            conn.execute(
                f"UPDATE jobs SET status = ?, updated_at = ?, reason = ?{clear} WHERE id = ?",
                (new.value, now, reason, job_id),
            )
            self._log_transition(conn, job_id, current, new, reason, now)
            return self._get(conn, job_id)

    def update_progress(self, job_id: str, progress: dict[str, Any], *, heartbeat: bool = True) -> None:
        """Merge `progress` (step, total_steps, epoch, loss, avg_loss, lr, it_per_s, eta_s...) into the job's."""
        _check_json_object("progress", progress)
        validate_job_id(job_id)
        with self._write() as conn:
            row = conn.execute("SELECT progress FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise _not_found(job_id)
            merged = {**json.loads(row[0]), **progress}
            now = time.time()
            if heartbeat:
                conn.execute(
                    "UPDATE jobs SET progress = ?, heartbeat_at = ? WHERE id = ?",
                    (json.dumps(merged, sort_keys=True), now, job_id),
                )
            else:
                conn.execute(
                    "UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(merged, sort_keys=True), job_id)
                )

    def set_process(self, job_id: str, pid: int | None, pgid: int | None) -> None:
        """Record (or clear, with None) the process and process group working on the job."""
        self._update_one(job_id, "UPDATE jobs SET pid = ?, pgid = ? WHERE id = ?", (pid, pgid, job_id))

    def record_event_offset(self, job_id: str, line: int) -> None:
        """Remember that the first `line` lines of the job's events.jsonl have been ingested."""
        if line < 0:
            raise TrainManagementError(
                f"job {job_id}: event offset {line} is negative", "pass a line count >= 0"
            )
        self._update_one(job_id, "UPDATE jobs SET events_offset = ? WHERE id = ?", (line, job_id))

    def add_output(self, job_id: str, path: str) -> None:
        """Record a file the job produced (a saved LoRA, a sample); recording the same path twice is a no-op."""
        validate_job_id(job_id)
        with self._write() as conn:
            self._require(conn, job_id)
            conn.execute(
                "INSERT OR IGNORE INTO outputs (job_id, path, at) VALUES (?, ?, ?)",
                (job_id, path, time.time()),
            )

    def delete(self, job_id: str) -> None:
        """Remove a finished (completed/failed/cancelled) or interrupted job: its rows, then its folder."""
        folder = self.job_dir(job_id)
        with self._write() as conn:
            current = self._require(conn, job_id)
            if not (current.is_terminal or current is JobStatus.INTERRUPTED):
                raise JobActive(
                    f"job {job_id} is '{current}' and cannot be deleted",
                    "cancel it first and wait until it is 'cancelled'",
                )
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        # The folder goes after the commit: a crash in between leaves an orphan folder, never a job
        # row whose folder is gone.
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            raise StoreError(
                f"job {job_id} was deleted, but its folder {folder} could not be removed entirely",
                "remove that folder by hand (check its permissions)",
            )

    # -- helpers ----------------------------------------------------------------------------------

    def _require(self, conn: sqlite3.Connection, job_id: str) -> JobStatus:
        row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise _not_found(job_id)
        return JobStatus(row[0])

    def _update_one(self, job_id: str, sql: str, args: tuple[Any, ...]) -> None:
        validate_job_id(job_id)
        with self._write() as conn:
            if conn.execute(sql, args).rowcount != 1:
                raise _not_found(job_id)

    @staticmethod
    def _log_transition(
        conn: sqlite3.Connection, job_id: str, old: JobStatus | None, new: JobStatus, reason: str, at: float
    ) -> None:
        conn.execute(
            "INSERT INTO transitions (job_id, from_status, to_status, at, reason) VALUES (?, ?, ?, ?, ?)",
            (job_id, old.value if old is not None else None, new.value, at, reason),
        )


_DB_HINT = "check that the home directory is writable, not full, and holds a Train Management jobs.sqlite3"
