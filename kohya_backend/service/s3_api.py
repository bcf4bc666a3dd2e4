"""The S3 routes of the REST API: the prefix in use, and "Upload to S3" of a local dataset or model.

`GET /models` and `GET /datasets` (service/api.py) list the prefix's entries beside the local ones, marked
`"source": "s3"`; these routes add the rest. Plain `def` handlers: S3 calls run in FastAPI's thread pool.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from kohya_backend.service.http_errors import http_errors
from kohya_backend.service.training import TrainingService


class UploadRequest(BaseModel):
    """Body of POST /s3/uploads: a local dataset (folder name) or model (checkpoint name) to upload."""

    kind: str
    name: str


def s3_fields(service: TrainingService, error: str | None) -> dict[str, Any]:
    """The S3 part of a list answer: the prefix (None when none is set) and why it could not be listed."""
    prefix = service.s3.prefix
    return {"s3_prefix": str(prefix) if prefix else None, "s3_error": error}


def add_s3_routes(router: APIRouter, service: TrainingService) -> None:
    """GET /s3, POST /s3/uploads, GET /s3/uploads/{ticket} (behind the router's auth, like every route)."""

    @router.get("/s3")
    def s3_info() -> dict[str, Any]:
        prefix = service.s3.prefix
        return {
            "prefix": str(prefix) if prefix else None,
            "models": str(prefix.child("models/")) if prefix else None,
            "datasets": str(prefix.child("datasets/")) if prefix else None,
        }

    @router.post("/s3/uploads", status_code=202)
    def start_upload(body: UploadRequest) -> dict[str, Any]:
        with http_errors():
            return {"upload": service.s3.start_upload(body.kind, body.name)}

    @router.get("/s3/uploads/{ticket}")
    def upload_status(ticket: str) -> dict[str, Any]:
        with http_errors():
            return {"upload": service.s3.upload_status(ticket)}
