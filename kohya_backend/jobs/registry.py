"""The workers this extension may send jobs to: name, URL and token, kept in HOME/workers.json (mode 0600).

Tokens live only in that file and in requests to their worker; every listing leaves them out. The file also holds
this home's client id, which makes a job's submission to a worker idempotent across retries and restarts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.runner import write_json_atomic
from kohya_backend.jobs.worker_protocol import (
    InvalidName,
    normalize_worker_url,
    plain_http_warning,
    read_token,
    validate_worker_name,
)
from kohya_backend.locks import file_lock

log = logging.getLogger(__name__)

REGISTRY_NAME = "workers.json"


class WorkerNotFound(TrainManagementError):
    """No worker of this name is registered."""

    http_status = 404


class WorkerConflict(TrainManagementError):
    """Adding this worker would rename or replace another registered one."""

    http_status = 409


@dataclass(frozen=True)
class WorkerEntry:
    """One registered worker; `token` never leaves this process except to its own worker."""

    name: str
    url: str
    token: str = field(repr=False)
    added_at: float

    def public(self) -> dict[str, Any]:
        """What listings show: everything but the token, plus a warning when the token travels unencrypted."""
        return {
            "name": self.name,
            "url": self.url,
            "added_at": self.added_at,
            "warning": plain_http_warning(self.url),
        }

    def stored(self) -> dict[str, Any]:
        """The row kept in workers.json (with the token)."""
        return {"name": self.name, "url": self.url, "added_at": self.added_at, "token": self.token}


def default_worker_name(url: str) -> str:
    """A name from a worker URL: its host (and port), lowercased, odd characters as '-'."""
    host = re.sub(r"^https?://", "", normalize_worker_url(url)).split("/")[0]
    name = re.sub(r"[^a-z0-9_.-]+", "-", host.lower().replace(":", "-")).strip("-._")
    return validate_worker_name(name[:63] or "worker")


def _check_token(token: object) -> str:
    """The token stripped; refused when empty or holding what an Authorization header cannot carry (spaces,
    control characters, anything outside printable ASCII)."""
    text = token.strip() if isinstance(token, str) else ""
    if not text or not all("!" <= c <= "~" for c in text):
        raise TrainManagementError(
            "the worker token is empty or holds spaces, control characters or characters outside ASCII",
            "paste the token from the worker's token file",
        )
    return text


def _name_for(
    url: str, wanted: str | None, default: str, same_url: dict[str, Any] | None, workers: list[dict[str, Any]]
) -> str:
    """The name a worker at `url` gets: its registered one (renaming is refused), else `wanted` or `default`."""
    if same_url is not None:
        current = str(same_url.get("name"))
        if wanted is not None and wanted != current:
            raise WorkerConflict(
                f"the worker at {url} is already registered as {current!r}; it keeps that name",
                f"to rename it, remove it (`workers remove {current}`, once no job uses it) and add it again "
                f"as {wanted!r}; to update its token, add it again without a name",
            )
        return current
    name = wanted or default
    taken = next((w for w in workers if w.get("name") == name), None)
    if taken is not None and wanted is None:
        raise WorkerConflict(
            f"a worker named {name!r} is already registered, at {taken.get('url')}",
            "give this one another name, or name it explicitly to move that worker to this URL",
        )
    return name


class WorkerRegistry:
    """Registered workers in HOME/workers.json; re-read when the file changes (the CLI may edit it meanwhile)."""

    def __init__(self, home_root: Path) -> None:
        self.path = Path(home_root) / REGISTRY_NAME
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._data: dict[str, Any] = {"client_id": "", "workers": []}

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Serialise writers across threads and processes (the WebUI and the CLI may both edit the file)."""
        with self._lock, file_lock(self.path):
            yield

    def _load(self) -> dict[str, Any]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {"client_id": "", "workers": []}
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TrainManagementError(
                    f"the worker list {self.path} cannot be read: {exc}",
                    "fix or delete that file and add the workers again",
                ) from exc
            self._data = data if isinstance(data, dict) else {"client_id": "", "workers": []}
            self._stamp = stamp
        return self._data

    def _save(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.path, data, mode=0o600)

    def entries(self) -> list[WorkerEntry]:
        """Every registered worker, in the order they were added."""
        found = []
        for raw in self._load().get("workers") or []:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                found.append(
                    WorkerEntry(str(raw["name"]), str(raw["url"]), str(raw["token"]), float(raw["added_at"]))
                )
        return found

    def get(self, name: str) -> WorkerEntry | None:
        """The worker called `name`, or None."""
        return next((e for e in self.entries() if e.name == name), None)

    def require(self, name: str) -> WorkerEntry:
        """The worker called `name`; WorkerNotFound (listing the known ones) when there is none."""
        entry = self.get(name)
        if entry is None:
            known = ", ".join(e.name for e in self.entries()) or "none"
            raise WorkerNotFound(f"no worker named {name!r} is registered", f"registered workers: {known}")
        return entry

    def client_id(self) -> str:
        """This home's random id (created on first use), part of every job's idempotency key on workers."""
        data = self._load()
        if data.get("client_id"):
            return str(data["client_id"])
        with self._file_lock():
            data = dict(self._load())
            if not data.get("client_id"):
                data["client_id"] = secrets.token_hex(8)
                self._save(data)
            return str(data["client_id"])

    def add(self, url: str, token: str, *, name: str | None = None) -> WorkerEntry:
        """Register a worker, or update one: its token (same URL) or its URL (same name, given explicitly).

        A registered URL keeps its name (jobs refer to workers by name): re-adding it under another name is
        refused (WorkerConflict), as is a name that would replace a worker at another URL without being asked for.
        Returns the entry (token inside, never shown).
        """
        clean_url = normalize_worker_url(url)
        clean_token = _check_token(token)
        try:
            wanted = validate_worker_name(name) if name else None
            default = default_worker_name(clean_url)
        except InvalidName as exc:
            raise TrainManagementError(exc.message, exc.hint) from exc
        with self._file_lock():
            data = dict(self._load())
            workers = [w for w in data.get("workers") or [] if isinstance(w, dict)]
            same_url = next((w for w in workers if w.get("url") == clean_url), None)
            clean_name = _name_for(clean_url, wanted, default, same_url, workers)
            old = next((w for w in workers if w.get("name") == clean_name), None)
            added_at = (
                float(old["added_at"])
                if old and isinstance(old.get("added_at"), (int, float))
                else time.time()
            )
            entry = WorkerEntry(clean_name, clean_url, clean_token, added_at)
            row = entry.stored()
            data["workers"] = [row if w is old else w for w in workers] if old else [*workers, row]
            data.setdefault("client_id", secrets.token_hex(8))
            self._save(data)
        return entry

    def remove(self, name: str) -> None:
        """Forget a worker; WorkerNotFound when there is none of that name."""
        self.require(name)
        with self._file_lock():
            data = dict(self._load())
            data["workers"] = [w for w in data.get("workers") or [] if w.get("name") != name]
            self._save(data)


def ensure_worker(
    home_dir: Path,
    url: str,
    *,
    token_file: Path | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Register the worker at `url` in a home (for `--train-worker URL --train-worker-token-file FILE`).

    Idempotent: calling it again with the same URL updates the token. Returns the public entry (no token); its
    `warning` (the token would travel over plain http) is also logged, so the WebUI's console shows it.
    """
    if token_file is None:
        raise TrainManagementError(
            f"worker {url} needs a token", "pass --train-worker-token-file FILE (the worker's token file)"
        )
    secret = read_token(
        Path(token_file),
        "copy the worker's token file to this machine and name it with --train-worker-token-file",
    )
    public = WorkerRegistry(Path(home_dir)).add(url, secret, name=name).public()
    if public["warning"]:
        log.warning("Train Management: worker %s: %s", public["name"], public["warning"])
    return public
