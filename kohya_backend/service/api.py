"""The REST API (prefix /train-management/v1): an APIRouter factory plus its request models.

Works on pydantic 1 and 2: the request models use plain fields only, and responses are built as dicts. Handlers
are plain `def`s (FastAPI runs them in its thread pool), so nothing blocks the event loop; submitting only queues the
job, the scheduler thread trains it. The log and event followers (service/streams.py) wait without a thread.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Query, Response
from pydantic import BaseModel

from kohya_backend.service.datasets_api import add_dataset_routes
from kohya_backend.service.http_errors import http_errors
from kohya_backend.service.s3_api import add_s3_routes, s3_fields
from kohya_backend.service.streams import add_stream_routes
from kohya_backend.service.text import TextCheckedRoute
from kohya_backend.service.training import Submission, TrainingService
from kohya_backend.service.workers_api import create_workers_router

API_PREFIX = "/train-management/v1"
API_VERSION = "1.0"
_STATUS_QUERY = Query(None, description="only jobs in these states (repeat, or comma-separated)")
_IDEMPOTENCY_KEY = Header(
    None,
    description="a key per submission (e.g. a UUID): sent again, the same job comes back (200) instead of a new one",
)


class FormatRequest(BaseModel):
    """Body of POST /config/format; model, dataset and instance type (optional) make it check what a job would."""

    config_params: str | dict[str, Any]
    fm_type: str
    model: str | None = None
    dataset: str | None = None
    training_instance_type: str = "local"
    gpus: int = 1  # GPUs per job: the plan counts steps as that many data-parallel processes take them


class TrainingParams(BaseModel):
    """Where and what to train, as in the original AWS solution."""

    training_instance_type: str = "local"
    model: str
    dataset: str
    fm_type: str
    gpus: int = 1  # GPUs per job: more than 1 trains data-parallel, one process per GPU


class TrainingRequest(BaseModel):
    """Body of POST /trainings: training_params plus config_params (TOML text or a JSON object)."""

    training_params: TrainingParams
    config_params: str | dict[str, Any] = ""


def create_router(service: TrainingService, *, prefix: str = API_PREFIX) -> APIRouter:
    """The Train Management API under `prefix` ("" for an app mounted at API_PREFIX). It checks no credentials
    itself: the app does, before any route runs (create_app's BearerTokenMiddleware, or the host's dependencies in
    mount_api)."""
    router = APIRouter(prefix=prefix, route_class=TextCheckedRoute)

    @router.get("/version")
    def version() -> dict[str, Any]:
        from kohya_backend import __version__

        return {"api": API_VERSION, "kohya_backend": __version__}

    @router.get("/instance-types")
    def instance_types() -> dict[str, Any]:
        with http_errors():
            return {"instance_types": service.instance_types()}

    @router.get("/models")
    def models() -> dict[str, Any]:
        with http_errors():
            roots = [str(root) for root in service.home.model_roots]
            on_s3, s3_error = service.s3.list_models()
            models = [{**m, "source": "local"} for m in service.home.list_models()] + on_s3
            return {"root": roots[0], "roots": roots, "models": models, **s3_fields(service, s3_error)}

    @router.get("/datasets")
    def datasets(caption_extension: str = ".txt") -> dict[str, Any]:
        with http_errors():
            on_s3, s3_error = service.s3.list_datasets()
            local = [{**d, "source": "local"} for d in service.home.list_datasets(caption_extension)]
            return {
                "root": str(service.home.datasets),
                "datasets": local + on_s3,
                **s3_fields(service, s3_error),
            }

    @router.post("/config/format")
    def format_config(body: FormatRequest) -> dict[str, Any]:
        with http_errors():
            if body.model:  # the same family check a submission gets
                service.check_model_family(body.model, body.fm_type)
            return service.format_config(
                body.config_params,
                body.fm_type,
                model=body.model,
                dataset=body.dataset,
                instance_type=body.training_instance_type,
                gpus=body.gpus,
            )

    @router.post("/trainings", status_code=201)
    def create_training(
        body: TrainingRequest, response: Response, idempotency_key: str | None = _IDEMPOTENCY_KEY
    ) -> dict[str, Any]:
        params = body.training_params
        with http_errors():
            job, created = service.submit_once(
                Submission(
                    model=params.model,
                    dataset=params.dataset,
                    fm_type=params.fm_type,
                    config_params=body.config_params,
                    instance_type=params.training_instance_type,
                    gpus=params.gpus,
                ),
                idempotency_key,
            )
            if not created:
                response.status_code = 200
            return {"job": service.show(job.id)}

    @router.get("/trainings")
    def list_trainings(
        status: list[str] | None = _STATUS_QUERY,
        offset: int = 0,
        limit: int = 50,
    ) -> dict[str, Any]:
        wanted = [s for item in status or [] for s in item.split(",") if s]
        with http_errors():
            return service.list(status=wanted or None, offset=offset, limit=limit)

    @router.get("/trainings/{job_id}")
    def show_training(job_id: str) -> dict[str, Any]:
        with http_errors():
            return {"job": service.show(job_id)}

    @router.post("/trainings/{job_id}/cancel")
    def cancel_training(job_id: str) -> dict[str, Any]:
        with http_errors():
            return {"job": service.cancel(job_id)}

    @router.post("/trainings/{job_id}/resume")
    def resume_training(job_id: str) -> dict[str, Any]:
        with http_errors():
            return {"job": service.resume(job_id)}

    @router.delete("/trainings/{job_id}", status_code=204)
    def delete_training(job_id: str) -> Response:
        with http_errors():
            service.delete(job_id)
        return Response(status_code=204)

    add_stream_routes(router, service)
    add_dataset_routes(router, service, [])
    add_s3_routes(router, service)
    router.include_router(create_workers_router(service, []))
    return router
