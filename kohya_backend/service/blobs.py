"""The worker's content-addressed blob store: files keyed by sha256, uploaded in resumable chunks, verified before use.

A blob is uploaded with `PUT /blobs/{sha256}?offset=N&size=TOTAL`; the bytes land in a partial file, hashed as they
arrive, so a dropped connection keeps what was received and `HEAD /blobs/{sha256}` says where to continue. Only
when the whole declared size has arrived and its sha256 matches does the file become a blob (read-only, under
blobs/sha256/). Sizes are capped and the free disk is checked before any byte is accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from kohya_backend.errors import TrainManagementError
from kohya_backend.fileio import fsync_dir
from kohya_backend.jobs.worker_protocol import (
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_RESERVE_BYTES,
    OFFSET_HEADER,
    SHA256_PATTERN,
    SIZE_HEADER,
    validate_sha256,
)
from kohya_backend.service.http_errors import http_errors

BLOBS_DIR = "blobs"  # under a worker's home
MAX_QUERY = 100_000
PARTIAL_MAX_AGE_S = 7 * 24 * 3600
SESSION_IDLE_S = (
    3600.0  # an upload nobody continued for this long gives its running hash back (re-read on resume)
)
_WRITE_BATCH = 4 << 20
_READ_CHUNK = 4 << 20


class BlobError(TrainManagementError):
    """An upload the blob store refuses (http_status: what the worker answers with)."""


class BlobTooLarge(BlobError):
    """The declared size exceeds the worker's limit, or more bytes arrived than were declared."""

    http_status = 413


class InsufficientStorage(BlobError):
    """The worker's disk has not enough free space for the rest of the blob."""

    http_status = 507


class UploadConflict(BlobError):
    """The upload's offset does not match what the worker holds, or another upload of it is running."""

    http_status = 409

    def __init__(self, message: str, hint: str | None, offset: int) -> None:
        super().__init__(message, hint)
        self.offset = offset

    def details(self) -> dict[str, object]:
        return {"offset": self.offset}


class HashMismatch(BlobError):
    """The bytes received do not hash to the sha256 they were uploaded as; the partial is discarded."""

    http_status = 422


@dataclass(frozen=True)
class BlobState:
    """What the store holds of one sha256: complete or not, the declared size (when known) and bytes held."""

    sha256: str
    complete: bool
    size: int | None
    offset: int


class _Session:
    """The running hash of a partial file, kept between requests so a continued upload need not re-read it."""

    def __init__(self, digest: Any, offset: int) -> None:
        self.digest = digest
        self.offset = offset
        self.touched = time.monotonic()


class BlobStore:
    """Complete blobs in ROOT/sha256/ab/<sha256>; uploads in progress in ROOT/partial/<sha256>.part (+ .json)."""

    def __init__(
        self,
        root: Path,
        *,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        session_idle_s: float = SESSION_IDLE_S,
    ) -> None:
        self.root = Path(root)
        self.complete_root = self.root / "sha256"
        self.partial_root = self.root / "partial"
        for folder in (self.complete_root, self.partial_root):
            folder.mkdir(parents=True, exist_ok=True)
        self.max_blob_bytes = max_blob_bytes
        self.reserve_bytes = reserve_bytes
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._sessions: dict[str, _Session] = {}
        self._reserved: dict[str, int] = {}  # declared sizes of the uploads in flight
        self.session_idle_s = session_idle_s

    # -- reading ------------------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Where the complete blob `sha256` lives (it may not exist)."""
        sha = validate_sha256(sha256)
        return self.complete_root / sha[:2] / sha

    def path(self, sha256: str) -> Path | None:
        """The complete blob's file, or None when the store does not hold it (yet)."""
        path = self.blob_path(sha256)
        return path if path.is_file() else None

    def _partial(self, sha: str) -> tuple[Path, Path]:
        return self.partial_root / f"{sha}.part", self.partial_root / f"{sha}.json"

    def state(self, sha256: str) -> BlobState:
        """Complete (with its size), partial (bytes held and declared size) or absent (offset 0)."""
        sha = validate_sha256(sha256)
        complete = self.path(sha)
        if complete is not None:
            size = complete.stat().st_size
            return BlobState(sha, True, size, size)
        part, meta = self._partial(sha)
        try:
            declared = int(json.loads(meta.read_text(encoding="utf-8"))["size"])
            held = part.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            return BlobState(sha, False, None, 0)
        return BlobState(sha, False, declared, min(held, declared))

    def states(self, shas: Iterable[str]) -> list[BlobState]:
        """state() of many blobs at once (the client asks about a whole dataset in one request)."""
        shas = list(shas)
        if len(shas) > MAX_QUERY:
            raise BlobError(f"{len(shas)} blobs asked about at once", f"ask about at most {MAX_QUERY}")
        return [self.state(s) for s in shas]

    def free_bytes(self) -> int:
        """Free space on the store's disk."""
        return int(shutil.disk_usage(self.root).free)

    # -- uploading ----------------------------------------------------------------------------------------

    def open_upload(self, sha256: str, offset: int, size: int) -> Upload:
        """Start or continue an upload at `offset` of a blob of `size` bytes; raises when it cannot go on."""
        sha = validate_sha256(sha256)
        if not isinstance(size, int) or size < 0 or size > self.max_blob_bytes:
            raise BlobTooLarge(
                f"blob {sha[:12]}: {size} bytes exceeds this worker's limit of {self.max_blob_bytes} bytes",
                "start the worker with a larger --max-blob-gb, or train a smaller file",
            )
        with self._lock:
            if sha in self._busy:
                raise UploadConflict(
                    f"blob {sha[:12]} is being uploaded by another request",
                    "wait and retry from the offset HEAD reports",
                    self.state(sha).offset,
                )
            self._busy.add(sha)
            self._prune_sessions()
        try:
            return self._open(sha, offset, size)
        except BaseException:
            self._release(sha)
            raise

    def _prune_sessions(self) -> None:
        """Forget running hashes of uploads nobody continued for session_idle_s (caller holds the lock)."""
        cutoff = time.monotonic() - self.session_idle_s
        for sha in [s for s, kept in self._sessions.items() if kept.touched < cutoff and s not in self._busy]:
            del self._sessions[sha]

    def sessions_held(self) -> int:
        """How many running hashes of unfinished uploads are kept in memory."""
        with self._lock:
            return len(self._sessions)

    def _check_space(self, sha: str, offset: int, size: int) -> None:
        """Reserve the rest of this upload, or InsufficientStorage when it and the other uploads in flight do
        not fit (each would pass a check of the free space alone)."""
        with self._lock:
            others = 0
            for other, declared in self._reserved.items():
                session = self._sessions.get(other)
                if other != sha:
                    others += max(0, declared - (session.offset if session is not None else 0))
            free = self.free_bytes()
            if free < size - offset + others + self.reserve_bytes:
                raise InsufficientStorage(
                    f"blob {sha[:12]}: {size - offset} more bytes do not fit: {free} bytes free on the worker, "
                    f"{others} promised to other uploads in flight, {self.reserve_bytes} kept in reserve",
                    "free disk space on the worker (`python -m kohya_backend worker gc`) or start it with "
                    "another --home; or retry once the other uploads are done",
                )
            self._reserved[sha] = size

    def _open(self, sha: str, offset: int, size: int) -> Upload:
        current = self.state(sha)
        if current.complete:
            return Upload(self, sha, size, None, None)
        part, meta = self._partial(sha)
        if offset == 0:
            with self._lock:
                self._sessions.pop(sha, None)
            part.unlink(missing_ok=True)
        elif current.size != size or current.offset != offset:
            raise UploadConflict(
                f"blob {sha[:12]}: the worker holds {current.offset} bytes of {current.size}, "
                f"not {offset} of {size}",
                "continue from the offset HEAD reports (or from 0 to start over)",
                current.offset,
            )
        self._check_space(sha, offset, size)
        meta.write_text(json.dumps({"size": size, "started_at": time.time()}), encoding="utf-8")
        handle = open(part, "ab")  # noqa: SIM115 (closed by Upload.close)
        return Upload(self, sha, size, handle, self._session(sha, part, offset))

    def _session(self, sha: str, part: Path, offset: int) -> _Session:
        session = self._sessions.get(sha)
        if session is not None and session.offset == offset:
            session.touched = time.monotonic()
            return session
        digest = hashlib.sha256()  # a worker restart lost the running hash: re-read what is held
        if offset:
            with open(part, "rb") as handle:
                while block := handle.read(min(_READ_CHUNK, offset - handle.tell())):
                    digest.update(block)
        session = _Session(digest, offset)
        with self._lock:
            self._sessions[sha] = session
        return session

    def _publish(self, sha: str, digest: str) -> None:
        part, meta = self._partial(sha)
        with self._lock:
            self._sessions.pop(sha, None)
        if digest != sha:
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise HashMismatch(
                f"blob {sha[:12]}: the bytes received hash to {digest[:12]}, not to the sha256 they were sent as",
                "the file changed while it was uploaded, or the connection corrupted it; upload it again",
            )
        final = self.blob_path(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(part, 0o444)  # blobs are hard-linked into jobs: nothing may write through a link
        os.replace(part, final)
        meta.unlink(missing_ok=True)
        fsync_dir(final.parent)

    def _release(self, sha: str) -> None:
        with self._lock:
            self._busy.discard(sha)
            self._reserved.pop(sha, None)

    def remove_stale_partials(self, max_age_s: float) -> tuple[int, int]:
        """Remove uploads nobody continued for `max_age_s` seconds: (how many, bytes freed)."""
        removed = freed = 0
        cutoff = time.time() - max_age_s
        for part in self.partial_root.glob("*.part"):
            with contextlib.suppress(OSError):
                stat = part.stat()
                if stat.st_mtime < cutoff and part.stem not in self._busy:
                    part.unlink()
                    part.with_suffix(".json").unlink(missing_ok=True)
                    with self._lock:
                        self._sessions.pop(part.stem, None)
                    removed += 1
                    freed += stat.st_size
        return removed, freed

    def remove_partial(self, sha256: str) -> bool:
        """Drop what arrived of an unfinished upload (False when there is none; UploadConflict while one runs)."""
        sha = validate_sha256(sha256)
        part, meta = self._partial(sha)
        with self._lock:
            if sha in self._busy:
                raise UploadConflict(
                    f"blob {sha[:12]} is being uploaded right now", "retry once the upload ended", 0
                )
            self._sessions.pop(sha, None)
            found = part.exists()
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
        return found

    def complete_paths(self) -> list[Path]:
        """The files of every complete blob."""
        return [p for p in self.complete_root.glob("*/*") if SHA256_PATTERN.fullmatch(p.name)]


class Upload:
    """One request's worth of an upload: write() hashes and appends, finish() publishes a completed blob."""

    def __init__(
        self, store: BlobStore, sha: str, size: int, handle: Any | None, session: _Session | None
    ) -> None:
        self.store = store
        self.sha = sha
        self.size = size
        self._handle = handle
        self._session = session

    @property
    def already_complete(self) -> bool:
        """True when the store held the whole blob before this request: its body need not be read."""
        return self._handle is None and self._session is None

    def write(self, data: bytes) -> None:
        """Append `data`; BlobTooLarge (writing nothing) if it would go past the declared size."""
        if not data or self._handle is None or self._session is None:
            return
        if self._session.offset + len(data) > self.size:
            raise BlobTooLarge(
                f"blob {self.sha[:12]}: more bytes arrived than the {self.size} declared",
                "send exactly the declared size",
            )
        self._handle.write(data)
        self._session.digest.update(data)
        self._session.offset += len(data)
        self._session.touched = time.monotonic()

    def finish(self) -> BlobState:
        """Flush; when every byte has arrived, verify the hash and publish the blob (HashMismatch if it differs)."""
        if self._handle is not None and self._session is not None:
            self._handle.flush()
            if self._session.offset == self.size:
                os.fsync(self._handle.fileno())
                self._handle.close()
                self._handle = None
                self.store._publish(self.sha, self._session.digest.hexdigest())
        return self.store.state(self.sha)

    def close(self) -> None:
        """Close the partial file (what arrived stays) and let the next request continue the upload."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None
        self.store._release(self.sha)


# -- HTTP ---------------------------------------------------------------------------------------------------


class BlobQuery(BaseModel):
    """Body of POST /blobs/query: the sha256s a client wants to know about."""

    sha256: list[str]


def _state_headers(state: BlobState) -> dict[str, str]:
    headers = {OFFSET_HEADER: str(state.offset)}
    if state.size is not None:
        headers[SIZE_HEADER] = str(state.size)
    return headers


async def _receive(request: Request, upload: Upload) -> bool:
    """Stream the request body into `upload` in batches; False when the client went away mid-body."""
    pending: list[bytes] = []
    held = 0
    try:
        async for chunk in request.stream():
            pending.append(chunk)
            held += len(chunk)
            if held >= _WRITE_BATCH:
                await to_thread.run_sync(upload.write, b"".join(pending))
                pending, held = [], 0
    except ClientDisconnect:
        await to_thread.run_sync(upload.write, b"".join(pending))
        return False
    await to_thread.run_sync(upload.write, b"".join(pending))
    return True


def create_blob_router(store: BlobStore) -> APIRouter:
    """HEAD/PUT /blobs/{sha256} and POST /blobs/query; the caller adds the prefix and the token check."""
    router = APIRouter()

    @router.head("/blobs/{sha256}")
    def head_blob(sha256: str) -> Response:
        with http_errors():
            state = store.state(sha256)
        return Response(status_code=200 if state.complete else 404, headers=_state_headers(state))

    @router.post("/blobs/query")
    def query_blobs(body: BlobQuery) -> dict[str, Any]:
        with http_errors():
            states = store.states(body.sha256)
        return {
            "complete": [s.sha256 for s in states if s.complete],
            "partial": {s.sha256: s.offset for s in states if not s.complete and s.offset},
            "missing": [s.sha256 for s in states if not s.complete],
        }

    @router.put("/blobs/{sha256}")
    async def put_blob(
        request: Request, sha256: str, offset: int = Query(..., ge=0), size: int = Query(..., ge=0)
    ) -> Response:
        with http_errors():  # a 409 names the offset to continue from
            upload = await to_thread.run_sync(store.open_upload, sha256, offset, size)
        if upload.already_complete:  # answer at once: the body (up to the declared size) is never read
            await to_thread.run_sync(upload.close)
            state = store.state(sha256)
            body = {"sha256": state.sha256, "complete": True, "offset": state.offset, "size": state.size}
            headers = {**_state_headers(state), "Connection": "close"}
            return Response(json.dumps(body), 200, headers, "application/json")
        try:
            with http_errors():
                finished = await _receive(request, upload)
                state = await to_thread.run_sync(upload.finish)
        finally:
            await to_thread.run_sync(upload.close)
        if not finished:  # nobody reads this answer; the bytes that arrived are kept
            return Response(status_code=400)
        body = {"sha256": state.sha256, "complete": state.complete, "offset": state.offset, "size": size}
        return Response(
            content=json.dumps(body),
            media_type="application/json",
            status_code=201 if state.complete else 200,
            headers=_state_headers(state),
        )

    return router
