"""Mounting the REST API on a host's FastAPI app (the WebUI's), behind the host's credentials when it has any.

The API is an app of its own mounted at its prefix, so that it carries its own request guard (Host, Origin, JSON
bodies: service/guard.py) without touching the WebUI's routes, and serves its own OpenAPI schema and docs at
`<prefix>/openapi.json` and `<prefix>/docs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kohya_backend.service.guard import GuardPolicy
    from kohya_backend.service.training import TrainingService


def _mounted(app: Any, prefix: str) -> bool:
    for route in app.router.routes:
        path = str(getattr(route, "path", ""))
        if path == prefix or path.startswith(prefix + "/"):
            return True
    return False


def mount_api(
    app: Any, service: TrainingService, users: Mapping[str, str] | None, policy: GuardPolicy | None = None
) -> bool:
    """Mount the API app under its prefix (HTTP basic auth for `users`, the request guard of `policy`, default
    loopback names only); False when `app` already has it.

    The WebUI calls on_app_started once per app it creates (a new one after "Reload UI"), so a second call for
    the same app is a no-op rather than a duplicate mount.
    """
    from fastapi import Depends, FastAPI

    from kohya_backend.host.auth import basic_auth_dependency
    from kohya_backend.service.api import API_PREFIX, create_router
    from kohya_backend.service.guard import GuardPolicy, JsonBodies, RequestGuard
    from kohya_backend.service.hosts import answered_hosts

    if _mounted(app, API_PREFIX):
        return False
    api = FastAPI(
        title="Train Management",
        description="Train kohya-compatible LoRAs for SD 1.5 and SDXL",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    dependencies = [Depends(basic_auth_dependency(users))] if users else []
    api.include_router(create_router(service, prefix=""), dependencies=dependencies)
    policy = policy or GuardPolicy(hosts=answered_hosts("127.0.0.1"))
    api.add_middleware(JsonBodies, policy=policy)
    api.add_middleware(RequestGuard, policy=policy)
    app.mount(API_PREFIX, api)
    return True
