"""The API's following routes: a job's log (tail, or followed) and its events (long-poll or server-sent events).

Followers wait with `await asyncio.sleep`, not in a worker thread: inside the WebUI the thread pool is shared with
its own endpoints, so a few dozen open followers must not hold a thread each. File and database reads are short
and run in the thread pool one at a time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.progress import EventTail, tail_lines
from kohya_backend.service.http_errors import http_errors
from kohya_backend.service.training import TrainingService

MAX_WAIT_S = 60.0
FOLLOW_MAX_S = 3600.0
_POLL_S = 0.25
# Where each job's events.jsonl was last read up to (line count -> byte offset), shared by all clients: a client
# following a job asks for the lines after the last ones it got, which is this position, so the file is not
# re-read from its start on every poll.
_EVENT_POSITIONS = EventTail()


def _read_from(path: Path, position: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(position)
            return handle.read()
    except FileNotFoundError:
        return b""


async def follow_log(service: TrainingService, job_id: str, max_s: float) -> AsyncIterator[bytes]:
    """The log from the start, then new bytes as they come, until the job settles (or `max_s` passes)."""
    path = service.log_path(job_id)
    position = 0
    deadline = time.monotonic() + max_s
    while True:
        settled = await run_in_threadpool(service.is_settled, job_id)
        chunk = await run_in_threadpool(_read_from, path, position)
        if chunk:
            position += len(chunk)
            yield chunk
        if settled or time.monotonic() > deadline:
            return
        await asyncio.sleep(_POLL_S)


def _events_now(
    service: TrainingService, job_id: str, path: Path, after: int
) -> tuple[list[dict[str, Any]], bool]:
    settled = service.is_settled(job_id)
    events, _ = _EVENT_POSITIONS.read(job_id, path, after)
    if settled:
        _EVENT_POSITIONS.forget(job_id)  # nothing more will come: do not keep its position forever
    return events, settled


async def wait_events(
    service: TrainingService, job_id: str, after: int, wait_s: float
) -> tuple[list[dict[str, Any]], bool]:
    """Events after line `after`, waiting up to `wait_s` for the first one unless the job has settled; and whether
    it had settled before they were read (then they are its last ones, and a follower may stop)."""
    path = service.events_path(job_id)
    deadline = time.monotonic() + wait_s
    while True:
        events, settled = await run_in_threadpool(_events_now, service, job_id, path, after)
        if events or settled or time.monotonic() >= deadline:
            return events, settled
        await asyncio.sleep(_POLL_S)


async def server_sent_events(
    service: TrainingService, job_id: str, after: int, max_s: float
) -> AsyncIterator[str]:
    """Server-sent events: one `id:`/`data:` record per trainer event, until the job settles."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        wait = min(5.0, max(0.0, deadline - time.monotonic()))
        events, settled = await wait_events(service, job_id, after, wait)
        for event in events:
            after += 1
            yield f"id: {after}\ndata: {json.dumps(event)}\n\n"
        if settled:
            job = await run_in_threadpool(service.store.get, job_id)
            yield f"event: end\ndata: {json.dumps({'status': job.status.value, 'next': after})}\n\n"
            return
        if not events:
            yield ": keep-alive\n\n"


def add_stream_routes(router: APIRouter, service: TrainingService) -> None:
    """GET /trainings/{id}/logs and /trainings/{id}/events."""

    @router.get("/trainings/{job_id}/logs")
    def training_logs(job_id: str, tail: int = 200, follow: bool = False) -> Response:
        with http_errors():
            if tail < 1:
                raise TrainManagementError(f"tail={tail} is not a line count", "use tail >= 1")
            path = service.log_path(job_id)  # 400/404 before any stream starts
            if follow:
                return StreamingResponse(follow_log(service, job_id, FOLLOW_MAX_S), media_type="text/plain")
            return PlainTextResponse(tail_lines(path, tail))

    @router.get("/trainings/{job_id}/events")
    async def training_events(request: Request, job_id: str, after: int = 0, timeout: float = 20.0) -> Any:
        with http_errors():
            if after < 0:
                raise TrainManagementError(f"after={after} is negative", "use the `next` of the last answer")
            await run_in_threadpool(service.events_path, job_id)  # 400/404 before waiting
            if "text/event-stream" in request.headers.get("accept", ""):
                stream = server_sent_events(service, job_id, after, FOLLOW_MAX_S)
                return StreamingResponse(stream, media_type="text/event-stream")
            events, settled = await wait_events(service, job_id, after, min(max(timeout, 0.0), MAX_WAIT_S))
            job = await run_in_threadpool(service.store.get, job_id)
            # `settled`: the job had settled before these events were read, so they are its last ones.
            return {
                "events": events,
                "next": after + len(events),
                "status": job.status.value,
                "settled": settled,
            }
