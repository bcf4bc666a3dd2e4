"""What keeps other websites out of the app: the Host check, the Origin check and JSON-only bodies (ASGI middleware).

A page on any other site can make the user's browser send requests here. CORS only governs whether that page may
read an answer, and simple requests (a form post, a `text/plain` or untyped fetch) are sent without asking first,
so the guard refuses, before any route runs or any body is read:
- a Host header the server does not answer to (DNS rebinding: another site's name resolving to 127.0.0.1): 421;
- a state-changing request (POST, PUT, PATCH, DELETE, and every WebSocket) whose Origin, or Referer when there is
  no Origin, is neither this app's own origin nor one the user configured: 403;
- under the JSON paths, a body whose Content-Type is not JSON (or a multipart upload): 415, since FastAPI reads an
  untyped body as JSON (JsonBodies, which runs inside the token check).
Clients that send no Origin and no Referer (curl, scripts, the CLI) are not browsers and pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from kohya_backend.errors import TrainManagementError
from kohya_backend.service.hosts import host_name, is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)"
_HOST_HEADER = re.compile(rf"{_HOST}(?::([0-9]{{1,5}}))?")
_ORIGIN = re.compile(rf"((?i:https?))://{_HOST}(?::([0-9]{{1,5}}))?/?")
_BODY_TYPES = ("application/json", "multipart/form-data")


class BadOrigin(TrainManagementError):
    """A --cors-allow-origins entry that is not an origin (scheme://host[:port])."""


@dataclass(frozen=True)
class Origin:
    """A browser origin, normalised: lowercase scheme and host (IPv6 compressed, without brackets), explicit
    port."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = DEFAULT_PORTS[self.scheme] == self.port
        return f"{self.scheme}://{host}" if default else f"{self.scheme}://{host}:{self.port}"


def _port(text: str | None) -> int | None:
    """A port number from its digits (None for none given); ValueError when out of range."""
    if text is None:
        return None
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return port


def parse_origin(text: str) -> Origin | None:
    """`scheme://host[:port]` as browsers send it in Origin (None for `null` or anything else)."""
    match = _ORIGIN.fullmatch(text.strip())
    if match is None:
        return None
    scheme, host = match.group(1).lower(), host_name(match.group(2))
    try:
        port = _port(match.group(3))
    except ValueError:
        return None
    return Origin(scheme, host, DEFAULT_PORTS[scheme] if port is None else port)


def referer_origin(text: str) -> Origin | None:
    """The origin of a Referer URL (None when it is not an http(s) URL with a plain host)."""
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        return None
    if "@" in parts.netloc:
        return None
    return parse_origin(f"{parts.scheme}://{parts.netloc}")


def parse_host(text: str) -> tuple[str, int | None] | None:
    """A Host header as (lowercase name or address without brackets, port or None); None when malformed."""
    match = _HOST_HEADER.fullmatch(text.strip())
    if match is None:
        return None
    try:
        return host_name(match.group(1)), _port(match.group(2))
    except ValueError:
        return None


def configured_origins(values: Iterable[str], *, where: str) -> tuple[str, ...]:
    """Comma-separated origins (a flag's values) normalised as browsers send them; `*` stands for every origin."""
    found: list[str] = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            if item == "*":
                found.append("*")
                continue
            origin = parse_origin(item)
            if origin is None:
                raise BadOrigin(
                    f"{where}: {item!r} is not an origin",
                    "write origins as scheme://host[:port], e.g. http://127.0.0.1:3000, separated by commas",
                )
            found.append(str(origin))
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True)
class GuardPolicy:
    """Whom the guard lets in.

    `hosts`: the Host names the server answers to (None: any; loopback addresses always pass). `origins`: origins
    besides the app's own that may send state-changing requests (normalised; "*" allows every origin), with
    `origin_regex` matched whole. `origin_hosts`: host names (host_name's form) whose pages count as the app's own
    on any scheme and port: the names a reverse proxy serves it under, which may reach it with another Host.
    `json_paths`: path prefixes whose request bodies must be JSON or multipart ("" for every path).
    """

    hosts: frozenset[str] | None
    origins: tuple[str, ...] = ()
    origin_regex: str | None = None
    json_paths: tuple[str, ...] = ("",)
    origin_hosts: frozenset[str] = frozenset()

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request's Host header names this server."""
        parsed = parse_host(host) if host else None
        if parsed is None:
            return False
        return self.hosts is None or parsed[0] in self.hosts or is_loopback(parsed[0])

    def origin_allowed(self, origin: Origin | None, host: str | None) -> bool:
        """Whether `origin` is the app's own (same host and port as the Host header) or a configured one."""
        if origin is None:
            return False
        own = parse_host(host) if host else None
        if (
            own is not None
            and own[0] == origin.host
            and (own[1] or DEFAULT_PORTS[origin.scheme]) == origin.port
        ):
            return True
        if "*" in self.origins or str(origin) in self.origins or origin.host in self.origin_hosts:
            return True
        return self.origin_regex is not None and re.fullmatch(self.origin_regex, str(origin)) is not None

    def needs_json(self, path: str) -> bool:
        """Whether bodies sent to `path` must be JSON (or multipart)."""
        return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in self.json_paths)


def foreign_origin(headers: Mapping[str, str], policy: GuardPolicy) -> str | None:
    """The page a request came from, as a message names it, when that page is neither the app's own (the Host
    header's origin) nor one `policy` allows; None when it may act, also when the request names no page at all
    (no Origin and no Referer: not a browser). `headers` must look names up case-insensitively (starlette's)."""
    origin_text, referer = headers.get("origin"), headers.get("referer")
    if origin_text is None and referer is None:
        return None
    origin = parse_origin(origin_text) if origin_text is not None else referer_origin(referer or "")
    if policy.origin_allowed(origin, headers.get("host")):
        return None
    return origin_text if origin_text is not None else f"the page {referer!r}"


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, error: str, message: str, hint: str
) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting answers the handshake with 403; the browser's page learns nothing more.
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"detail": {"error": error, "message": message, "hint": hint}}).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _has_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length.strip() not in ("", "0"))


class RequestGuard:
    """ASGI middleware applying a GuardPolicy to every HTTP request and WebSocket of the app it wraps."""

    def __init__(self, app: ASGIApp, *, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await _refuse(scope, receive, send, *refusal)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> tuple[int, str, str, str] | None:
        """(status, error, message, hint) when the request must be refused, else None."""
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.policy.host_allowed(host):
            return (
                421,
                "UnknownHost",
                f"this server does not answer to the host name {host!r}",
                "open it by the address it serves on (e.g. http://127.0.0.1:PORT/); to use another name, add it to "
                "the allowed hosts (--allowed-hosts NAME, in the WebUI --train-allowed-hosts NAME)",
            )
        state_changing = scope["type"] == "websocket" or scope.get("method", "GET") not in SAFE_METHODS
        if not state_changing:
            return None
        shown = foreign_origin(headers, self.policy)
        if shown is not None:
            return (
                403,
                "ForeignOrigin",
                f"a request from {shown} may not change anything here: it is not this app's own page",
                "use the app's own page or API client; to allow another site, add its origin with "
                "--cors-allow-origins",
            )
        return None


class JsonBodies:
    """ASGI middleware: under the policy's JSON paths, a state-changing request's body must be JSON (or a multipart
    upload), else 415 before anything reads it. Kept apart from RequestGuard so that it runs inside the token
    check: a client without the token learns nothing but 401."""

    def __init__(self, app: ASGIApp, *, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method", "GET") not in SAFE_METHODS:
            headers = Headers(scope=scope)
            if self.policy.needs_json(scope["path"]) and _has_body(headers):
                kind = headers.get("content-type", "").split(";")[0].strip().lower()
                if kind not in _BODY_TYPES and not (
                    kind.startswith("application/") and kind.endswith("+json")
                ):
                    await _refuse(
                        scope,
                        receive,
                        send,
                        415,
                        "UnsupportedMediaType",
                        f"the request body is sent as {kind or 'untyped data'!r}, not as JSON",
                        "send JSON with 'Content-Type: application/json' (dataset uploads: multipart/form-data)",
                    )
                    return
        await self.app(scope, receive, send)
