"""Bearer tokens, shared by the standalone API and the remote worker: how strong one must be, and the ASGI
middleware that checks it and backs off clients that guess."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kohya_backend.errors import TrainManagementError
from kohya_backend.service.login_limit import LoginLimiter, retry_after, scope_client

MIN_TOKEN_CHARS = 16
TOKEN_RECIPE = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class WeakToken(TrainManagementError):
    """A bearer token too short to guard a server others can reach."""


def check_token(token: str, source: str, error: type[TrainManagementError] = WeakToken) -> str:
    """`token` when it has at least MIN_TOKEN_CHARS characters; `error` naming `source` and how to make one."""
    if len(token) < MIN_TOKEN_CHARS:
        raise error(
            f"{source} is shorter than {MIN_TOKEN_CHARS} characters",
            f"use a long random token, e.g. `{TOKEN_RECIPE}`",
        )
    return token


class BearerTokenMiddleware:
    """Checks `Authorization: Bearer <token>` (constant-time) before any route runs or any body is read.

    A middleware rather than a route dependency: FastAPI parses a JSON body before a dependency could refuse it,
    and an unauthenticated client must not make the server read anything. Only paths under `prefix` are guarded
    (the standalone app's gradio page has its own login); `open_paths` stay open. Each refused token counts against
    its client in `limiter` (the login page's, where there is one) the moment it is checked: after a few, that
    client gets 429 with Retry-After, whatever it sends, until its back-off has passed; other clients are not held
    up, and a client's correct token forgets its failures.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str,
        open_paths: frozenset[str],
        prefix: str = "",
        hint: str = "",
        limiter: LoginLimiter | None = None,
        what: str = "API token",
    ) -> None:
        self.app = app
        self.expected = token.encode("utf-8")
        self.open_paths = open_paths
        self.prefix = prefix
        self.hint = hint or "send the header 'Authorization: Bearer <token>'"
        self.limiter = limiter if limiter is not None else LoginLimiter()
        self.what = what

    def _guarded(self, path: str) -> bool:
        if path in self.open_paths:
            return False
        return not self.prefix or path == self.prefix or path.startswith(self.prefix.rstrip("/") + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        client = scope_client(scope)
        # Counted as failed at once (until the token is found right): a burst of guesses earns the back-off.
        wait = self.limiter.attempt(client)
        if wait > 0:
            detail = {
                "error": "TooManyFailures",
                "message": f"too many refused tokens from {client}",
                "hint": f"wait {int(wait) + 1} s, then send the right token ({self.hint})",
            }
            answer = JSONResponse(
                {"detail": detail}, status_code=429, headers={"Retry-After": retry_after(wait).decode()}
            )
            await answer(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected):
            self.limiter.succeeded(client)
            await self.app(scope, receive, send)
            return
        self.limiter.failed(client, counted=True, what=self.what)
        detail = {"error": "Unauthorized", "message": "a valid bearer token is required", "hint": self.hint}
        answer = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await answer(scope, receive, send)
