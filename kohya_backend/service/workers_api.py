"""REST routes of the worker registry (under the API prefix): list, add and remove remote GPU workers.

Tokens go in (POST) and never come out: listings show name, URL, GPU, state and load only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.registry import WorkerNotFound
from kohya_backend.jobs.remote import RUNNER_NAME, RemoteRunner
from kohya_backend.service.training import TrainingService


class WorkerBusy(TrainManagementError):
    """A worker still runs jobs of this host, so it cannot be removed."""


class WorkerRequest(BaseModel):
    """Body of POST /workers: the URL the worker printed and its token (a name is derived when left out)."""

    url: str
    token: str = Field(..., repr=False)
    name: str | None = None


def remote_runner(service: TrainingService) -> RemoteRunner:
    """The service's remote runner; an error saying so when this host has none."""
    runner = service.scheduler.runners.get(RUNNER_NAME)
    if not isinstance(runner, RemoteRunner):
        raise TrainManagementError(
            "remote workers are not enabled on this host", "build the service with build_service()"
        )
    return runner


def add_worker(service: TrainingService, url: str, token: str, name: str | None = None) -> dict[str, Any]:
    """Register a worker (or update its URL or token) and have the pool ask it for its state soon."""
    runner = remote_runner(service)
    entry = runner.registry.add(url, token, name=name)
    runner.pool.refresh_soon()
    return entry.public()


def remove_worker(service: TrainingService, name: str) -> None:
    """Forget a worker; refused while jobs of this host run there (cancel them first)."""
    runner = remote_runner(service)
    runner.registry.require(name)
    busy = {w["name"]: w["jobs_here"] for w in runner.workers()}
    if busy.get(name):
        raise WorkerBusy(
            f"worker {name!r} still runs {busy[name]} job(s) of this host",
            "cancel them (or wait until they end), then remove the worker",
        )
    runner.registry.remove(name)


@contextmanager
def _http_errors() -> Iterator[None]:
    try:
        yield
    except TrainManagementError as exc:
        status = 404 if isinstance(exc, WorkerNotFound) else 409 if isinstance(exc, WorkerBusy) else 400
        detail = {"error": type(exc).__name__, "message": exc.message, "hint": exc.hint}
        raise HTTPException(status_code=status, detail=detail) from exc


def create_workers_router(service: TrainingService, dependencies: list[Any]) -> APIRouter:
    """GET/POST /workers and DELETE /workers/{name}, behind the API's token check (`dependencies`)."""
    router = APIRouter(dependencies=dependencies)

    @router.get("/workers")
    def list_workers() -> dict[str, Any]:
        with _http_errors():
            return {"workers": remote_runner(service).workers()}

    @router.post("/workers", status_code=201)
    def create_worker(body: WorkerRequest) -> dict[str, Any]:
        with _http_errors():
            return {"worker": add_worker(service, body.url, body.token, body.name)}

    @router.delete("/workers/{name}", status_code=204)
    def delete_worker(name: str) -> Response:
        with _http_errors():
            remove_worker(service, name)
        return Response(status_code=204)

    return router
