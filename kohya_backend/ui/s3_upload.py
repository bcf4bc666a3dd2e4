"""The tab's "Upload to S3" buttons (a dataset in the Datasets tab, the chosen model beside Model): thin generators
over S3Assets (service/s3_assets.py), which the REST API's POST /s3/uploads uses too; each yields the upload's
progress until it ends."""

from __future__ import annotations

import time
from collections.abc import Iterator

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.s3_jobs import human_bytes
from kohya_backend.service.training import TrainingService
from kohya_backend.storage.uri import is_s3_uri
from kohya_backend.ui.present import error_markdown

POLL_S = 0.5


class S3UploadActions:
    """The buttons' callbacks, bound to one TrainingService."""

    def __init__(self, service: TrainingService, poll_s: float = POLL_S) -> None:
        self.service = service
        self.poll_s = poll_s

    def upload_dataset(self, name: str | None) -> Iterator[str]:
        """Upload the chosen local dataset to the S3 prefix, yielding its progress until it ends."""
        return upload_dataset(self.service, name, self.poll_s)

    def upload_model(self, name: str | None) -> Iterator[str]:
        """Upload the chosen local model to the S3 prefix, yielding its progress until it ends."""
        return upload_model(self.service, name, self.poll_s)


def upload_dataset(service: TrainingService, name: str | None, poll_s: float = POLL_S) -> Iterator[str]:
    """Upload the chosen local dataset to the S3 prefix, yielding 'uploading NAME 1.2/3.4 MB' as it goes."""
    return _upload(service, "dataset", name, poll_s)


def upload_model(service: TrainingService, name: str | None, poll_s: float = POLL_S) -> Iterator[str]:
    """Upload the chosen local checkpoint to the S3 prefix (prefix/models/NAME), yielding its progress."""
    return _upload(service, "model", name, poll_s)


def _upload(service: TrainingService, kind: str, name: str | None, poll_s: float) -> Iterator[str]:
    if not name:
        yield f"Choose a {kind} first."
        return
    if is_s3_uri(name):  # the dropdowns list the prefix's own models and datasets too
        yield f"**{name}** is already on S3."
        return
    try:
        status = service.s3.start_upload(kind, name)
        while status["state"] == "running":
            yield f"Uploading **{name}** to {status['uri']}: {human_bytes(status['done'], status['total'])}"
            time.sleep(poll_s)
            status = service.s3.upload_status(status["ticket"])
    except TrainManagementError as exc:
        yield error_markdown(exc)
        return
    if status["state"] == "failed":
        error = status["error"]
        yield f"❌ Upload failed: {error['message']}" + (f"\n\n{error['hint']}" if error.get("hint") else "")
        return
    result = status["result"]
    yield (
        f"✅ **{name}** is on S3 at {result['uri']} ({result['files']} file(s); "
        f"{human_bytes(result['sent'], result['bytes'])} sent, the rest was already there)."
    )
