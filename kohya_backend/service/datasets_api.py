"""The dataset routes of the REST API (create from a multipart upload, show, images, captions, delete).

Added to the router of service/api.py with the same auth dependency and error mapping; plain `def` handlers, so
unpacking and image checks run in FastAPI's thread pool, never on the event loop. Works on pydantic 1 and 2.
"""

from __future__ import annotations

import mimetypes
from typing import Any

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel

from kohya_backend.data.preprocess import Preprocess
from kohya_backend.service.datasets import DatasetService, IncomingFile
from kohya_backend.service.http_errors import http_errors
from kohya_backend.service.training import TrainingService

_FILES = File(..., description="images, captions and zips; a name may be a relative path (folder upload)")
_NAME = Form(..., description="the dataset folder name under datasets/")
_REPEATS = Form("10", description="repeats of the <repeats>_<subject> folder for files not already in one")
_SUBJECT = Form(None, description="the class token of that folder (default: the dataset name)")
_PREPROCESS = Form(None, description="'512-crop', '512-bucket', '1024-crop', '1024-bucket' or none")


class CaptionBody(BaseModel):
    """Body of PUT /datasets/{name}/captions/{image}."""

    caption: str


def add_dataset_routes(router: APIRouter, service: TrainingService, guarded: list[Any]) -> None:
    """Add the dataset routes to `router` (behind the `guarded` dependencies), over one DatasetService."""
    datasets = DatasetService(service.home, jobs=service.store)

    @router.post("/datasets", status_code=201, dependencies=guarded)
    def create_dataset(
        files: list[UploadFile] = _FILES,
        name: str = _NAME,
        repeats: str = _REPEATS,
        subject: str | None = _SUBJECT,
        preprocess: str | None = _PREPROCESS,
    ) -> dict[str, Any]:
        with http_errors():
            incoming = [IncomingFile(upload.filename or "upload", upload.file) for upload in files]
            return {
                "dataset": datasets.create(
                    name,
                    incoming,
                    repeats=repeats,
                    subject=subject or None,
                    preprocess=Preprocess.parse(preprocess),
                )
            }

    @router.get("/datasets/{name}", dependencies=guarded)
    def show_dataset(name: str, caption_extension: str = ".txt") -> dict[str, Any]:
        with http_errors():
            return {"dataset": datasets.show(name, caption_extension)}

    @router.get("/datasets/{name}/report", dependencies=guarded)
    def dataset_report(name: str, caption_extension: str = ".txt", verify: bool = True) -> dict[str, Any]:
        with http_errors():
            return {"report": datasets.validate(name, caption_extension, verify_images=verify)}

    @router.get("/datasets/{name}/health", dependencies=guarded)
    def dataset_health(name: str, caption_extension: str = ".txt", resolution: int = 512) -> dict[str, Any]:
        with http_errors():
            return {"health": datasets.health(name, caption_extension, resolution=resolution)}

    @router.get("/datasets/{name}/images/{image:path}", dependencies=guarded)
    def dataset_image(name: str, image: str) -> Response:
        with http_errors():
            path = datasets.image_path(name, image)
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"X-Content-Type-Options": "nosniff"})

    @router.get("/datasets/{name}/captions/{image:path}", dependencies=guarded)
    def read_caption(name: str, image: str, caption_extension: str = ".txt") -> dict[str, Any]:
        with http_errors():
            return {"image": image, "caption": datasets.read_caption(name, image, caption_extension)}

    @router.put("/datasets/{name}/captions/{image:path}", dependencies=guarded)
    def write_caption(
        name: str, image: str, body: CaptionBody, caption_extension: str = ".txt"
    ) -> dict[str, Any]:
        with http_errors():
            return datasets.write_caption(name, image, body.caption, caption_extension)

    @router.delete("/datasets/{name}/images/{image:path}", status_code=204, dependencies=guarded)
    def delete_image(name: str, image: str) -> Response:
        with http_errors():
            datasets.delete_image(name, image)
        return Response(status_code=204)

    @router.delete("/datasets/{name}", status_code=204, dependencies=guarded)
    def delete_dataset(name: str) -> Response:
        with http_errors():
            datasets.delete(name)
        return Response(status_code=204)
