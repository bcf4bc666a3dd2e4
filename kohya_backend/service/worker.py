"""The remote GPU worker: a job service without a UI (`python -m kohya_backend worker`).

It has its own home, job store, scheduler and local runner, plus a FastAPI app under WORKER_PREFIX: open health,
and behind the bearer token (compared in constant time) its info, the blob store, and the jobs clients submit.
Handlers that touch the disk are plain `def` (FastAPI runs them in its thread pool). The upload route is async and
hands every write to a thread; the events long-poll is async and waits with asyncio, holding no thread.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel

import kohya_backend
from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.runner import LocalRunner
from kohya_backend.jobs.scheduler import Scheduler, default_devices
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import JobStore
from kohya_backend.jobs.worker_protocol import (
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_RESERVE_BYTES,
    DEFAULT_WORKER_PORT,
    LOG_SIZE_HEADER,
    SHA256_HEADER,
    STATUS_HEADER,
    WORKER_API_VERSION,
    WORKER_PREFIX,
    read_token,
)
from kohya_backend.service.auth import BearerTokenMiddleware
from kohya_backend.service.auth import check_token as check_strength
from kohya_backend.service.blobs import (
    BLOBS_DIR,
    PARTIAL_MAX_AGE_S,
    BlobStore,
    create_blob_router,
)
from kohya_backend.service.home import Home
from kohya_backend.service.hosts import ANY_HOSTS, interface_addresses, proxy_options
from kohya_backend.service.http_errors import http_errors
from kohya_backend.service.login_limit import LoginLimiter
from kohya_backend.service.text import TextCheckedRoute
from kohya_backend.service.training import TrainingService
from kohya_backend.service.worker_gc import delete_blob
from kohya_backend.service.worker_jobs import MAX_LOG_CHUNK, WorkerJobs

TOKEN_ENV = "TRAIN_MANAGEMENT_WORKER_TOKEN"


class WorkerSetupError(TrainManagementError):
    """The worker cannot start as asked (no token, a weak token, an unreadable token file)."""


def check_token(token: str, source: str = "the worker's token") -> str:
    """`token` when it has at least MIN_TOKEN_CHARS characters; WorkerSetupError naming `source` otherwise."""
    return check_strength(token, source, WorkerSetupError)


def gpu_info() -> list[dict[str, Any]]:
    """Each visible CUDA GPU's index, name and memory in bytes (None when unknown); [] without one."""
    from kohya_backend.jobs.devices import detect_gpus

    return [
        {
            "index": gpu.index,
            "name": gpu.name,
            "vram_bytes": gpu.memory_mib * 2**20 if gpu.memory_mib is not None else None,
        }
        for gpu in detect_gpus()
    ]


@dataclass
class Worker:
    """Everything one worker process serves: its home, jobs (service + scheduler), blobs and machine facts."""

    service: TrainingService
    blobs: BlobStore
    jobs: WorkerJobs
    name: str
    gpus: list[dict[str, Any]] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """Machine and load facts clients use to choose a worker (no secrets, no paths)."""
        store = self.service.store
        active = store.list(status=JobStatus.active(), limit=1)[1]
        queued = store.list(status=[JobStatus.QUEUED], limit=1)[1]
        devices = self.service.scheduler.devices
        return {
            "api": WORKER_API_VERSION,
            "version": kohya_backend.__version__,
            "name": self.name,
            "gpus": self.gpus,
            "devices": devices,
            "slots": sum(devices.values()),
            "active_jobs": active,
            "queued_jobs": queued,
            "free_disk_bytes": self.blobs.free_bytes(),
            "max_blob_bytes": self.blobs.max_blob_bytes,
        }


def build_worker(
    home_dir: Path,
    *,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    poll_interval_s: float = 1.0,
    devices: dict[str, int] | None = None,
) -> Worker:
    """A worker's home, job store, scheduler (local runner, no Lora folder, names unique per client) and blobs."""
    home = Home(home_dir)
    found = devices or default_devices()
    scheduler = Scheduler(
        JobStore(home.root),
        [LocalRunner()],
        lora_dir=None,
        devices=found,
        poll_interval_s=poll_interval_s,
        unique_names=False,
    )
    service = TrainingService(home, scheduler, restrict_paths=True)
    blobs = BlobStore(home.root / BLOBS_DIR, max_blob_bytes=max_blob_bytes, reserve_bytes=reserve_bytes)
    blobs.remove_stale_partials(PARTIAL_MAX_AGE_S)
    gpus = gpu_info() if any(d.startswith("cuda") for d in found) else []
    return Worker(service, blobs, WorkerJobs(service, blobs), socket.gethostname(), gpus)


class JobRequest(BaseModel):
    """Body of POST /jobs (checked field by field in WorkerJobs.submit, with messages a client can act on)."""

    client_key: str
    fm_type: str
    output_name: str | None = None
    config_params: dict[str, Any] = {}
    inputs: dict[str, Any]
    gpus: int = 1  # GPUs per job: the worker gives the job that many of its GPUs (data-parallel)


def _job_routes(router: APIRouter, jobs: WorkerJobs) -> None:
    service = jobs.service

    @router.post("/jobs", status_code=201)
    def submit(body: JobRequest, response: Response) -> dict[str, Any]:
        with http_errors():
            fields = ("client_key", "fm_type", "output_name", "config_params", "inputs", "gpus")
            view, created = jobs.submit({name: getattr(body, name) for name in fields})
        if not created:
            response.status_code = 200
        return {"job": view}

    @router.get("/jobs/{job_id}")
    def show(job_id: str) -> dict[str, Any]:
        with http_errors():
            return {"job": jobs.view(job_id)}

    @router.get("/jobs/{job_id}/events")
    async def events(job_id: str, after: int = 0, wait: float = 0.0) -> dict[str, Any]:
        with http_errors():
            return await jobs.events(job_id, after, wait)

    @router.get("/jobs/{job_id}/log")
    def log(job_id: str, offset: int = 0, limit: int = MAX_LOG_CHUNK) -> Response:
        with http_errors():
            data, size, status = jobs.log(job_id, offset, limit)
        headers = {LOG_SIZE_HEADER: str(size), STATUS_HEADER: status}
        return Response(content=data, media_type="application/octet-stream", headers=headers)

    @router.get("/jobs/{job_id}/files/{relpath:path}")
    def output_file(job_id: str, relpath: str) -> FileResponse:
        with http_errors():
            path, info = jobs.output_file(job_id, relpath)
        headers = {SHA256_HEADER: info["sha256"]}
        return FileResponse(path, media_type="application/octet-stream", headers=headers)

    @router.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        with http_errors():
            service.cancel(job_id)
            return {"job": jobs.view(job_id)}

    @router.post("/jobs/{job_id}/resume")
    def resume(job_id: str) -> dict[str, Any]:
        with http_errors():
            service.resume(job_id)
            return {"job": jobs.view(job_id)}

    @router.delete("/jobs/{job_id}", status_code=204)
    def delete(job_id: str) -> Response:
        with http_errors():
            service.delete(job_id)
        return Response(status_code=204)


def create_worker_app(worker: Worker, *, token: str, limiter: LoginLimiter | None = None) -> FastAPI:
    """The worker's FastAPI app; every route but /health needs `Authorization: Bearer <token>`, and a client whose
    tokens are refused backs off (`limiter`, default a new one: 429 with Retry-After after a few)."""
    if not token:
        raise WorkerSetupError("a worker needs a token", "pass --token-file FILE")
    check_token(token)
    app = FastAPI(
        title="Train Management worker",
        openapi_url=f"{WORKER_PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    open_routes = APIRouter(prefix=WORKER_PREFIX)

    @open_routes.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "api": WORKER_API_VERSION}

    guarded = APIRouter(prefix=WORKER_PREFIX, route_class=TextCheckedRoute)

    @guarded.get("/info")
    def info() -> dict[str, Any]:
        return worker.info()

    guarded.include_router(create_blob_router(worker.blobs))

    @guarded.delete("/blobs/{sha256}")
    def delete_blob_route(sha256: str) -> dict[str, Any]:
        service = worker.service
        with http_errors():
            return delete_blob(service.home, service.store, worker.blobs, sha256)

    _job_routes(guarded, worker.jobs)
    app.include_router(open_routes)
    app.include_router(guarded)
    app.add_middleware(
        BearerTokenMiddleware,
        token=token,
        open_paths=frozenset({f"{WORKER_PREFIX}/health"}),
        hint="send the header 'Authorization: Bearer <token>' with the worker's token",
        limiter=limiter or LoginLimiter(),
        what="worker token",
    )
    return app


def read_token_file(path: Path, *, create: bool = False) -> str:
    """The token in `path` (first line, stripped); with `create`, a missing file gets a new random token (0600)."""
    path = Path(path).expanduser()
    if create and not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    token = read_token(
        path, "create it with --create-token, or write a long random token into it (chmod 600)"
    )
    check_token(token, f"the token in {path}")
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {path} is readable by other users; chmod 600 it", flush=True)
    return token


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def reachable_urls(host: str, port: int) -> list[str]:
    """URLs clients can use for a worker bound to `host`: for every interface (0.0.0.0 or ::), this machine's
    name and each interface address (loopback last; IPv6 link-local left out: it needs a zone), else `host` itself.
    """
    if host not in ANY_HOSTS:
        return [_url(host, port)]
    names = [socket.gethostname(), *interface_addresses(host)]
    return [_url(name, port) for name in names]


def describe(worker: Worker, host: str, port: int) -> str:
    """The startup banner: the URLs to paste into the extension, GPU (or CPU), VRAM and free disk."""
    urls = reachable_urls(host, port)
    lines = [f"Train Management worker on {urls[0]} (API {WORKER_PREFIX})"]
    lines += [f"  also reachable as {url}" for url in urls[1:]]
    if worker.gpus:
        for gpu in worker.gpus:
            vram = f"{gpu['vram_bytes'] / 2**30:.1f} GiB VRAM" if gpu["vram_bytes"] else "VRAM unknown"
            lines.append(f"GPU {gpu['index']}: {gpu['name']}, {vram}")
    else:
        lines.append("GPU: none found; jobs train on the CPU")
    free = shutil.disk_usage(worker.service.home.root).free
    lines.append(f"free disk: {free / 2**30:.1f} GiB in {worker.service.home.root}")
    return "\n".join(lines)


def serve_worker(
    home_dir: Path,
    *,
    token: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_WORKER_PORT,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    forwarded_allow_ips: str | None = None,
) -> None:
    """Start the scheduler thread and serve the worker API until interrupted; X-Forwarded-For names a client only
    when a proxy in `forwarded_allow_ips` sends it."""
    import uvicorn

    worker = build_worker(home_dir, max_blob_bytes=max_blob_bytes, reserve_bytes=reserve_bytes)
    app = create_worker_app(worker, token=token)
    worker.service.scheduler.start()
    print(describe(worker, host, port), flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            "note: plain HTTP; put the worker behind a TLS reverse proxy or an SSH tunnel on untrusted networks",
            flush=True,
        )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", **proxy_options(forwarded_allow_ips))
    finally:
        worker.service.scheduler.stop()
