"""REST routes of the worker registry (under the API prefix): list, add and remove remote GPU workers.

Tokens go in (POST) and never come out: listings show name, URL, GPU, state and load only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.remote import RUNNER_NAME, RemoteRunner
from kohya_backend.jobs.remote import remove_worker as remove_registered
from kohya_backend.service.http_errors import http_errors
from kohya_backend.service.text import TextCheckedRoute
from kohya_backend.service.training import TrainingService


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
    """Register a worker (or update its URL or token) and ask it at once: the entry (no token) with its state,
    which the pool keeps (online, busy, offline with why, or unauthorized for a wrong token)."""
    runner = remote_runner(service)
    entry = runner.registry.add(url, token, name=name)
    state = runner.pool.check_now(entry.name).public()
    return {**state, **entry.public()}


def remove_worker(service: TrainingService, name: str) -> None:
    """Forget a worker; refused (WorkerBusy, with the job ids) while queued or running jobs use it."""
    remove_registered(remote_runner(service).registry, service.store, name)


def create_workers_router(service: TrainingService, dependencies: list[Any]) -> APIRouter:
    """GET/POST /workers and DELETE /workers/{name}, behind the API's token check (`dependencies`)."""
    router = APIRouter(dependencies=dependencies, route_class=TextCheckedRoute)

    @router.get("/workers")
    def list_workers() -> dict[str, Any]:
        with http_errors():
            return {"workers": remote_runner(service).workers()}

    @router.post("/workers", status_code=201)
    def create_worker(body: WorkerRequest) -> dict[str, Any]:
        with http_errors():
            return {"worker": add_worker(service, body.url, body.token, body.name)}

    @router.delete("/workers/{name}", status_code=204)
    def delete_worker(name: str) -> Response:
        with http_errors():
            remove_worker(service, name)
        return Response(status_code=204)

    return router
