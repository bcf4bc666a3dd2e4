"""The HTTP client of a remote worker (httpx): one method per worker endpoint, errors sorted by what to do next.

`WorkerUnreachable` (network errors, timeouts, 5xx from a proxy) is worth retrying; `WorkerAuthError` (401, or 429
once the worker backs off this host's refused tokens), `WorkerRejected` (any other 4xx, 507) and
`WorkerAnswerInvalid` (an id or a download the client refuses) are not.
Job ids are checked before they go into a URL. Downloads land under a temporary name, stop at a size cap, are
checked against the sha256 the worker sends, fsynced and renamed, so a half-downloaded file never has the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.store import validate_job_id
from kohya_backend.jobs.worker_protocol import (
    LOG_SIZE_HEADER,
    OFFSET_HEADER,
    SHA256_HEADER,
    STATUS_HEADER,
    WORKER_PREFIX,
    normalize_worker_url,
    validate_relpath,
    validate_sha256,
)

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
_DOWNLOAD_CHUNK = 1 << 20
MAX_DOWNLOAD_BYTES = 8 << 30  # far above any LoRA; the cap when the worker did not say the file's size


class WorkerError(TrainManagementError):
    """Talking to a remote worker failed."""


class WorkerUnreachable(WorkerError):
    """The worker did not answer (network error, timeout, or a gateway error from a proxy): retry later."""


class WorkerAuthError(WorkerError):
    """The worker refused the token (401), or backs off after refusing it too often (429)."""


class WorkerAnswerInvalid(WorkerError):
    """The worker answered something this client refuses to use (a malformed job id, an oversized download)."""


class WorkerRejected(WorkerError):
    """The worker refused the request (4xx or 507); `status` and `detail` say why."""

    def __init__(self, message: str, hint: str | None, status: int, detail: dict[str, Any]) -> None:
        super().__init__(message, hint)
        self.status = status
        self.detail = detail


class WorkerClient:
    """Calls one worker's API (`url` as it printed it) with its bearer token."""

    def __init__(self, url: str, token: str, *, read_timeout_s: float = READ_TIMEOUT_S) -> None:
        self.url = normalize_worker_url(url)
        self._http = httpx.Client(
            base_url=self.url + WORKER_PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(read_timeout_s, connect=CONNECT_TIMEOUT_S),
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------------------

    def _send(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201), **kwargs: Any
    ) -> httpx.Response:
        try:
            answer = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise WorkerUnreachable(
                f"worker {self.url} did not answer {method} {path}: {type(exc).__name__}: {exc}",
                "check that the worker runs and that this machine can reach it",
            ) from exc
        if answer.status_code in ok:
            return answer
        raise self._error(answer, method, path)

    def _error(self, answer: httpx.Response, method: str, path: str) -> WorkerError:
        status = answer.status_code
        if status == 401:
            return WorkerAuthError(
                f"worker {self.url} refused the token", "copy the token from the worker's token file again"
            )
        if status >= 500 and status != 507:
            return WorkerUnreachable(
                f"worker {self.url} answered {status} to {method} {path}", "it may be restarting; retrying"
            )
        try:
            body = answer.json()
        except ValueError:
            body = {}
        detail = body.get("detail") if isinstance(body, dict) else None
        detail = detail if isinstance(detail, dict) else {"message": str(detail or answer.text[:300])}
        if status == 429 and detail.get("error") == "TooManyFailures":  # the worker backs off refused tokens
            return WorkerAuthError(
                f"worker {self.url} refused the token too often and waits {answer.headers.get('retry-after')} s "
                "before checking it again",
                "copy the token from the worker's token file again",
            )
        message = str(detail.get("message") or f"HTTP {status}")
        return WorkerRejected(
            f"worker {self.url} refused {method} {path} ({status}): {message}",
            detail.get("hint") if isinstance(detail.get("hint"), str) else None,
            status,
            detail,
        )

    # -- machine ------------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """GET /info: GPUs, devices, slots, active and queued jobs, free disk, blob size limit."""
        return dict(self._send("GET", "/info").json())

    # -- blobs --------------------------------------------------------------------------------------------

    def blob_offset(self, sha256: str) -> tuple[bool, int]:
        """(complete, bytes the worker holds) for one blob: HEAD /blobs/{sha256}."""
        answer = self._send("HEAD", f"/blobs/{validate_sha256(sha256)}", ok=(200, 404))
        return answer.status_code == 200, int(answer.headers.get(OFFSET_HEADER, "0"))

    def query_blobs(self, shas: list[str]) -> dict[str, Any]:
        """POST /blobs/query: which of `shas` are complete, partial (with offsets) or missing."""
        return dict(self._send("POST", "/blobs/query", json={"sha256": shas}).json())

    def delete_blob(self, sha256: str) -> dict[str, Any]:
        """DELETE /blobs/{sha256}: refused (409, the job ids in `detail`) while jobs that may still train link it."""
        return dict(self._send("DELETE", f"/blobs/{validate_sha256(sha256)}").json())

    def put_blob(
        self, sha256: str, offset: int, size: int, body: Iterable[bytes], length: int
    ) -> dict[str, Any]:
        """PUT /blobs/{sha256}?offset=&size= with `length` bytes from `body`; the worker's new offset."""
        answer = self._send(
            "PUT",
            f"/blobs/{validate_sha256(sha256)}",
            params={"offset": offset, "size": size},
            content=body,
            headers={"Content-Length": str(length), "Content-Type": "application/octet-stream"},
        )
        return dict(answer.json())

    # -- jobs ---------------------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        """POST /jobs: the worker's job (the existing one when `client_key` was seen before)."""
        return _checked_view(self._send("POST", "/jobs", json=spec).json(), self.url)

    def job(self, job_id: str) -> dict[str, Any] | None:
        """GET /jobs/{id}, or None when the worker has no such job (any more)."""
        answer = self._send("GET", _job_path(job_id), ok=(200, 404))
        return _checked_view(answer.json(), self.url) if answer.status_code == 200 else None

    def events(self, job_id: str, after: int, wait_s: float) -> dict[str, Any]:
        """GET /jobs/{id}/events: events after line `after` (waiting up to `wait_s` for new ones), `next`, the job's
        `status`, and `settled` (the job had settled before they were read: no more will come)."""
        path = _job_path(job_id, "/events")
        return dict(self._send("GET", path, params={"after": after, "wait": wait_s}).json())

    def log(self, job_id: str, offset: int) -> tuple[bytes, int, str]:
        """GET /jobs/{id}/log: (bytes from `offset`, the log's size, the job's status)."""
        answer = self._send("GET", _job_path(job_id, "/log"), params={"offset": offset})
        return (
            answer.content,
            int(answer.headers.get(LOG_SIZE_HEADER, "0")),
            answer.headers.get(STATUS_HEADER, ""),
        )

    def cancel(self, job_id: str) -> dict[str, Any]:
        """POST /jobs/{id}/cancel."""
        return _checked_view(self._send("POST", _job_path(job_id, "/cancel")).json(), self.url)

    def resume(self, job_id: str) -> dict[str, Any]:
        """POST /jobs/{id}/resume."""
        return _checked_view(self._send("POST", _job_path(job_id, "/resume")).json(), self.url)

    def delete_job(self, job_id: str) -> bool:
        """DELETE /jobs/{id}: True when deleted, False when the worker had no such job; 409 while it runs."""
        return self._send("DELETE", _job_path(job_id), ok=(204, 404)).status_code == 204

    def download(
        self, job_id: str, relpath: str, target: Path, *, max_bytes: int = MAX_DOWNLOAD_BYTES
    ) -> tuple[str, int]:
        """GET /jobs/{id}/files/{relpath} into `target` atomically, checked against the worker's sha256.

        More than `max_bytes` (announced or arriving) is refused with WorkerAnswerInvalid and nothing is kept.
        """
        path = _job_path(job_id, "/files/" + validate_relpath(relpath, what="output file"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        digest = hashlib.sha256()
        size = 0
        try:
            with self._http.stream("GET", path) as answer:
                if answer.status_code != 200:
                    answer.read()
                    raise self._error(answer, "GET", path)
                expected = validate_sha256(answer.headers.get(SHA256_HEADER, ""))
                announced = int(answer.headers.get("Content-Length") or 0)
                with open(tmp, "xb") as handle:
                    for chunk in answer.iter_bytes(_DOWNLOAD_CHUNK):
                        size += len(chunk)
                        if max(size, announced) > max_bytes:
                            raise self._too_large(relpath, max(size, announced), max_bytes)
                        handle.write(chunk)
                        digest.update(chunk)
                    handle.flush()
                    os.fsync(handle.fileno())
            if digest.hexdigest() != expected:
                raise WorkerUnreachable(
                    f"{relpath} from worker {self.url} arrived damaged (sha256 {digest.hexdigest()[:12]}, "
                    f"expected {expected[:12]})",
                    "retrying the download",
                )
            os.replace(tmp, target)
        except httpx.TransportError as exc:
            raise WorkerUnreachable(
                f"downloading {relpath} from worker {self.url} failed: {type(exc).__name__}: {exc}",
                "retrying the download",
            ) from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return expected, size

    def _too_large(self, relpath: str, size: int, limit: int) -> WorkerAnswerInvalid:
        return WorkerAnswerInvalid(
            f"{relpath} from worker {self.url} is larger ({size} bytes) than expected (at most {limit})",
            "check the worker: it sent more than the job's view reported; the file was not kept",
        )


def _job_path(job_id: str, rest: str = "") -> str:
    """/jobs/{id}{rest}, refusing an id that is not the store's id shape before it reaches a URL."""
    return f"/jobs/{validate_job_id(job_id)}{rest}"


def _checked_view(body: object, url: str) -> dict[str, Any]:
    """The `job` of a worker's answer, its id checked (it goes into URLs, run.json and this host's progress)."""
    view = body.get("job") if isinstance(body, dict) else None
    if not isinstance(view, dict):
        raise WorkerAnswerInvalid(f"worker {url} answered without a job", "check the worker's version")
    try:
        validate_job_id(str(view.get("id")))
    except TrainManagementError as exc:
        raise WorkerAnswerInvalid(
            f"worker {url} answered an invalid job id {str(view.get('id'))[:80]!r}",
            "check the worker: its job ids look like 20261125-153012-ab12cd",
        ) from exc
    return dict(view)
