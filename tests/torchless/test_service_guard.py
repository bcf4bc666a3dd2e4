"""The request guard (service/guard.py) on its own: Host names, Origin and Referer of state-changing requests,
JSON-only bodies, with the near misses an attacker would try. The ASGI middleware is driven directly, with a
recording app behind it."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from kohya_backend.service.guard import (
    BadOrigin,
    GuardPolicy,
    JsonBodies,
    RequestGuard,
    configured_origins,
    parse_origin,
)
from kohya_backend.service.hosts import answered_hosts

HOST = "127.0.0.1:7861"
LOOPBACK = GuardPolicy(hosts=answered_hosts("127.0.0.1"), json_paths=("/api",))


def _call(
    middleware: type[Any],
    policy: GuardPolicy,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    *,
    path: str = "/api/trainings",
    kind: str = "http",
) -> tuple[int | None, bool]:
    """(status sent by the guard, or None; whether the request reached the app behind it)."""
    reached: list[bool] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    scope: dict[str, Any] = {"type": kind, "path": path, "headers": raw}
    if kind == "http":
        scope["method"] = method
    # A loop of its own, never made the thread's current one: asyncio.run would leave the main thread without an
    # event loop, and gradio 4 (later tests) would then create its app's stop event as None and never close it.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(middleware(app, policy=policy)(scope, receive, send))
    finally:
        loop.close()
    status = None
    for message in sent:
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "websocket.close":
            status = 403
    return status, bool(reached)


def guard(
    headers: dict[str, str], method: str = "POST", policy: GuardPolicy = LOOPBACK
) -> tuple[int | None, bool]:
    return _call(RequestGuard, policy, method, headers)


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"host": HOST, "origin": "http://127.0.0.1:7861"}, True),
        ({"host": HOST}, True),  # no Origin, no Referer: not a browser (curl, the CLI)
        ({"host": HOST, "origin": "http://127.0.0.1:7861.evil.com"}, False),
        ({"host": HOST, "origin": "null"}, False),  # sandboxed frames and file:// pages
        ({"host": HOST, "origin": "http://127.0.0.1:7862"}, False),  # another local server
        ({"host": HOST, "origin": "http://127.0.0.1"}, False),  # port 80 is not 7861
        ({"host": HOST, "origin": "http://localhost:7861"}, False),  # same machine, another origin
        ({"host": "LOCALHOST:7861", "origin": "http://localhost:7861"}, True),  # names are case-insensitive
        ({"host": "localhost:7861", "origin": "HTTP://LocalHost:7861"}, True),
        ({"host": "[::1]:7861", "origin": "http://[::1]:7861"}, True),
        ({"host": "[::1]:7861", "origin": "http://[::2]:7861"}, False),
        ({"host": "[0:0::1]:7861", "origin": "http://[::1]:7861"}, True),  # one address, two spellings
        ({"host": "[::1]:7861", "origin": "http://[::1]:7862"}, False),
        ({"host": HOST, "referer": "http://evil.example/page"}, False),  # no Origin, a foreign Referer
        ({"host": HOST, "referer": "http://127.0.0.1:7861@evil.example/"}, False),
        ({"host": HOST, "referer": "http://127.0.0.1:7862/"}, False),
        ({"host": HOST, "referer": "http://127.0.0.1:7861/?tab=train"}, True),
        ({"host": HOST, "referer": "not a url"}, False),
        ({"host": HOST, "origin": "http://127.0.0.1:7861", "referer": "http://evil.example/"}, True),
        ({"host": HOST, "origin": "http://evil.example", "referer": "http://127.0.0.1:7861/"}, False),
    ],
)
def test_state_changing_requests_need_the_apps_own_origin(headers: dict[str, str], allowed: bool) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        status, reached = guard(headers, method)
        assert reached is allowed, (method, headers)
        assert status == (None if allowed else 403)


def test_reading_is_not_refused_for_a_foreign_origin_but_a_foreign_host_is() -> None:
    # CORS keeps the answer from the foreign page; the Host check still applies (DNS rebinding reads answers).
    assert guard({"host": HOST, "origin": "http://evil.example"}, "GET") == (None, True)
    assert guard({"host": HOST, "origin": "http://evil.example"}, "OPTIONS") == (None, True)
    assert guard({"host": "evil.example:7861"}, "GET") == (421, False)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:7861", True),
        ("localhost:7861", True),
        ("localhost", True),
        ("[::1]:7861", True),
        ("127.0.0.2:7861", True),  # all of 127/8 is this machine
        ("evil.example:7861", False),  # a rebinding name that now resolves to 127.0.0.1
        ("127.0.0.1.evil.example:7861", False),
        ("localhost.evil.example", False),
        ("127.0.0.1:7861:1", False),
        ("127.0.0.1:99999", False),
        ("", False),
        ("192.168.1.20:7861", False),  # this machine's LAN address is not answered when bound to loopback
    ],
)
def test_the_host_header_must_name_this_server(host: str, allowed: bool) -> None:
    status, reached = guard({"host": host} if host else {}, "GET")
    assert reached is allowed and status == (None if allowed else 421)


def test_hosts_answered_depend_on_the_address_bound() -> None:
    everywhere = answered_hosts("0.0.0.0")
    assert everywhere is not None and socket.gethostname().lower() in everywhere and "127.0.0.1" in everywhere
    one = answered_hosts("192.168.1.20", ("gpu-box.example.com",))
    assert one is not None and {"192.168.1.20", "gpu-box.example.com", "localhost"} <= one
    assert socket.gethostname().lower() not in one or socket.gethostname() == "localhost"
    assert answered_hosts("127.0.0.1", ("*",)) is None
    policy = GuardPolicy(hosts=one)
    assert guard({"host": "GPU-box.example.com"}, "GET", policy) == (None, True)
    assert guard({"host": "other.example.com"}, "GET", policy) == (421, False)
    assert guard({"host": "anything.example"}, "GET", GuardPolicy(hosts=None)) == (None, True)


def test_allowed_hosts_count_by_name_however_they_are_written() -> None:
    """A port, a scheme or IPv6 brackets given with an allowed host do not make it a name no request can match."""
    written = ("Proxy.Example:8443", "https://tunnel.example/", "[2001:db8::5]", "2001:DB8:0:0::6")
    policy = GuardPolicy(hosts=answered_hosts("127.0.0.1", written))
    for host in (
        "proxy.example:8443",
        "proxy.example",
        "tunnel.example",
        "[2001:db8::5]:7861",
        "[2001:db8::6]",
    ):
        assert guard({"host": host}, "GET", policy) == (None, True), host
    assert guard({"host": "[2001:db8:0::6]:1"}, "GET", policy) == (None, True)  # IPv6 spelt either way
    assert guard({"host": "example"}, "GET", policy) == (421, False)
    assert guard({"host": "proxy.example.evil"}, "GET", policy) == (421, False)


def test_configured_origins_and_regex_are_allowed_exactly() -> None:
    policy = GuardPolicy(
        hosts=answered_hosts("127.0.0.1"),
        origins=configured_origins(["HTTP://Tools.Example.com:80/, http://127.0.0.1:3000"], where="flag"),
        origin_regex=r"https://[a-z]+\.trusted\.example",
    )
    assert policy.origins == ("http://tools.example.com", "http://127.0.0.1:3000")
    for origin, allowed in [
        ("http://tools.example.com", True),
        ("http://127.0.0.1:3000", True),
        ("https://tools.example.com", False),  # another scheme is another origin
        ("http://127.0.0.1:3001", False),
        ("https://ci.trusted.example", True),
        ("https://ci.trusted.example.evil.example", False),  # the regex must match whole
        ("http://ci.trusted.example", False),
    ]:
        assert guard({"host": HOST, "origin": origin}, policy=policy)[1] is allowed, origin
    everyone = GuardPolicy(hosts=None, origins=configured_origins(["*"], where="flag"))
    assert guard({"host": HOST, "origin": "http://evil.example"}, policy=everyone) == (None, True)


@pytest.mark.parametrize("bad", ["evil.example", "ftp://x", "http://x/path", "http://x:0", "http://"])
def test_a_configured_origin_that_is_not_one_is_refused(bad: str) -> None:
    with pytest.raises(BadOrigin, match="scheme://host"):
        configured_origins([f"http://ok.example,{bad}"], where="--cors-allow-origins")
    assert parse_origin(bad) is None


def test_websockets_from_another_origin_are_closed_before_they_open() -> None:
    call = _call
    assert call(
        RequestGuard, LOOPBACK, headers={"host": HOST, "origin": "http://evil.example"}, kind="websocket"
    ) == (
        403,
        False,
    )
    assert call(
        RequestGuard, LOOPBACK, headers={"host": HOST, "origin": "http://127.0.0.1:7861"}, kind="websocket"
    )[1]


@pytest.mark.parametrize(
    ("headers", "path", "allowed"),
    [
        ({"content-type": "application/json", "content-length": "2"}, "/api/trainings", True),
        ({"content-type": "application/json; charset=utf-8", "content-length": "2"}, "/api/trainings", True),
        ({"content-type": "application/merge-patch+json", "content-length": "2"}, "/api/x", True),
        (
            {"content-type": "APPLICATION/JSON", "content-length": "2"},
            "/api/trainings",
            True,
        ),  # types ignore case
        ({"content-type": " Application/Json ;charset=UTF-8", "content-length": "2"}, "/api/trainings", True),
        ({"content-type": "application/json-seq", "content-length": "2"}, "/api/trainings", False),
        ({"content-type": "application/jsonp", "content-length": "2"}, "/api/trainings", False),
        ({"content-type": "text/plain; x=application/json", "content-length": "2"}, "/api/trainings", False),
        ({"content-type": "text/json", "content-length": "2"}, "/api/trainings", False),
        ({"content-type": "multipart/form-data; boundary=x", "content-length": "9"}, "/api/datasets", True),
        ({"content-type": "text/plain", "content-length": "2"}, "/api/trainings", False),  # a cross-site form
        (
            {"content-type": "application/x-www-form-urlencoded", "content-length": "3"},
            "/api/trainings",
            False,
        ),
        ({"content-length": "2"}, "/api/trainings", False),  # untyped: FastAPI would read it as JSON
        ({"transfer-encoding": "chunked"}, "/api/trainings", False),
        ({"content-type": "text/plain", "content-length": "0"}, "/api/trainings/x/cancel", True),  # no body
        ({}, "/api/trainings/x/cancel", True),
        ({"content-type": "text/plain", "content-length": "2"}, "/apifoo", True),  # not under the JSON paths
        ({"content-type": "application/x-www-form-urlencoded", "content-length": "3"}, "/login", True),
    ],
)
def test_api_bodies_must_be_json_or_multipart(headers: dict[str, str], path: str, allowed: bool) -> None:
    status, reached = _call(JsonBodies, LOOPBACK, "POST", headers, path=path)
    assert reached is allowed and status == (None if allowed else 415)
    assert _call(JsonBodies, LOOPBACK, "GET", headers, path=path) == (None, True)
