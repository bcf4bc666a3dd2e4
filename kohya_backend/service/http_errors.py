"""The project's typed errors as HTTP answers, one mapping for the REST API, its dataset and worker routes, and
the remote worker: each error class carries its status (400 unless it says 404, 409, ...) and its extra fields."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException

from kohya_backend.errors import TrainManagementError


def error_body(exc: TrainManagementError) -> dict[str, Any]:
    """The JSON `detail` of an error answer: error name, message, hint, and the error's own details."""
    return {"error": type(exc).__name__, "message": exc.message, "hint": exc.hint, **exc.details()}


def http_error(exc: TrainManagementError, headers: dict[str, str] | None = None) -> HTTPException:
    """The HTTPException answering `exc`."""
    return HTTPException(status_code=exc.http_status, detail=error_body(exc), headers=headers)


@contextmanager
def http_errors() -> Iterator[None]:
    """Inside a route: turn the project's errors into their HTTP answers."""
    try:
        yield
    except TrainManagementError as exc:
        raise http_error(exc) from exc
