"""Mounting the REST API on a host's FastAPI app (the WebUI's), behind the host's credentials when it has any."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kohya_backend.service.training import TrainingService


def mount_api(app: Any, service: TrainingService, users: Mapping[str, str] | None) -> bool:
    """Add the API router under its prefix (HTTP basic auth for `users`); False when `app` already has it.

    The WebUI calls on_app_started once per app it creates (a new one after "Reload UI"), so a second call for
    the same app is a no-op rather than duplicate routes.
    """
    from fastapi import Depends

    from kohya_backend.host.auth import basic_auth_dependency
    from kohya_backend.service.api import API_PREFIX, create_router

    if any(str(getattr(route, "path", "")).startswith(API_PREFIX + "/") for route in app.router.routes):
        return False
    dependencies = [Depends(basic_auth_dependency(users))] if users else []
    app.include_router(create_router(service), dependencies=dependencies)
    return True
