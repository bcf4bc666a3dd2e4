"""HTTP basic auth for the API routes the extension adds to the WebUI's app.

Routes added in on_app_started are not covered by the WebUI's `--api-auth` (it guards only its own /sdapi routes)
nor by gradio's login, so the adapter applies the WebUI's credentials itself: `--api-auth` when set, else the
UI's `--gradio-auth` / `--gradio-auth-path` (a server with a login must not leave its training API open).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from fastapi import Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from kohya_backend.errors import TrainManagementError


def parse_credentials(specs: Iterable[str], *, where: str) -> dict[str, str]:
    """'user:pass,user2:pass2' items (the WebUI's format; quotes and spaces around names are dropped)."""
    users: dict[str, str] = {}
    for spec in specs:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            user, sep, password = item.partition(":")
            user, password = user.replace('"', "").strip(), password.replace('"', "").strip()
            if not sep or not user:
                raise TrainManagementError(
                    f"{where}: {item.split(':')[0]!r}... is not in the form user:password",
                    "write credentials as user:password, several separated by commas",
                )
            users[user] = password
    return users


def webui_credentials(
    api_auth: str | None, gradio_auth: str | None = None, gradio_auth_path: str | None = None
) -> dict[str, str] | None:
    """The users allowed on the extension's API: from --api-auth, else from the UI's login, else None (open)."""
    if api_auth:
        return parse_credentials([api_auth], where="--api-auth")
    specs = [gradio_auth] if gradio_auth else []
    if gradio_auth_path:
        try:
            specs += Path(gradio_auth_path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise TrainManagementError(
                f"cannot read --gradio-auth-path {gradio_auth_path}: {exc.strerror}",
                "fix the path, or pass --api-auth for the API",
            ) from exc
    users = parse_credentials(specs, where="--gradio-auth")
    return users or None


def _matches(credentials: Mapping[str, str], username: str, password: str) -> bool:
    """Compare against every user in constant time, so timing tells nothing about names or passwords."""
    found = False
    given_user, given_password = username.encode("utf-8"), password.encode("utf-8")
    for user, expected in credentials.items():
        same_user = hmac.compare_digest(given_user, user.encode("utf-8"))
        same_password = hmac.compare_digest(given_password, expected.encode("utf-8"))
        found |= same_user and same_password
    return found


def basic_auth_dependency(credentials: Mapping[str, str]) -> Callable[..., None]:
    """A FastAPI dependency that answers 401 (with a Basic challenge) unless the request carries a known user."""
    users = dict(credentials)
    security = HTTPBasic(realm="Train Management")

    def check(given: HTTPBasicCredentials = Depends(security)) -> None:  # noqa: B008 (FastAPI's idiom)
        if not _matches(users, given.username, given.password):
            raise HTTPException(
                status_code=401,
                detail={"error": "Unauthorized", "message": "unknown user or wrong password",
                        "hint": "use the WebUI's --api-auth credentials (HTTP basic auth)"},
                headers={"WWW-Authenticate": 'Basic realm="Train Management"'},
            )  # fmt: skip

    return check
