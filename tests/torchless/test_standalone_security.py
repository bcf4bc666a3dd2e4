"""The standalone app's tokens and login: a server others can reach needs a strong token, and its login page backs
off per client after failed attempts, logging each one."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_support import running, stranger

from kohya_backend.errors import TrainManagementError
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service
from kohya_backend.service.auth import BearerTokenMiddleware
from kohya_backend.service.hosts import proxy_options
from kohya_backend.service.login_limit import (
    BASE_WAIT_S,
    FREE_FAILURES,
    MAX_WAIT_S,
    LoginLimiter,
    LoginThrottle,
    client_key,
)
from kohya_backend.ui.standalone import build_app, serve

TOKEN = "a-long-enough-token-0123"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_a_server_others_can_reach_refuses_a_short_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    monkeypatch.delenv("TRAIN_MANAGEMENT_TOKEN", raising=False)
    with pytest.raises(TrainManagementError) as refused:
        serve(tmp_path / "home", host=host, port=1, token="fifteen-chars-x")
    assert "shorter than 16 characters" in refused.value.message and "--token" in refused.value.message
    assert "secrets.token_urlsafe" in (refused.value.hint or "")
    monkeypatch.setenv("TRAIN_MANAGEMENT_TOKEN", "short")
    with pytest.raises(TrainManagementError, match="TRAIN_MANAGEMENT_TOKEN"):
        serve(tmp_path / "home", host=host, port=1)
    assert not (tmp_path / "home").exists()  # refused before anything was made


def test_the_back_off_doubles_after_the_free_failures_and_a_success_forgets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock)
    with caplog.at_level(logging.WARNING, logger="kohya_backend.service.login_limit"):
        waits = [limiter.failed("10.0.0.5") for _ in range(FREE_FAILURES + 3)]
    assert waits == [0.0] * FREE_FAILURES + [BASE_WAIT_S, 2 * BASE_WAIT_S, 4 * BASE_WAIT_S]
    assert len(caplog.records) == FREE_FAILURES + 3 and "10.0.0.5" in caplog.records[-1].getMessage()
    assert limiter.wait_s("10.0.0.5") == 4 * BASE_WAIT_S and limiter.wait_s("10.0.0.6") == 0
    clock.now += 4 * BASE_WAIT_S
    assert limiter.wait_s("10.0.0.5") == 0
    for _ in range(40):
        limiter.failed("10.0.0.5")
    assert limiter.wait_s("10.0.0.5") == MAX_WAIT_S  # capped
    limiter.succeeded("10.0.0.5")
    assert limiter.wait_s("10.0.0.5") == 0 and limiter.failed("10.0.0.5") == 0  # counting starts over


def test_the_login_page_backs_off_per_client(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    app = build_app(build_service(tmp_path / "home"), token=TOKEN, logins=LoginLimiter(clock=clock))

    def login(client: str, password: str) -> httpx.Response:
        # The test is the reverse proxy (this machine, named as `serve --forwarded-allow-ips 127.0.0.1` names it):
        # X-Forwarded-For says which client each login comes from.
        return httpx.post(
            f"{base}/login",
            data={"username": "me", "password": password},
            headers={"X-Forwarded-For": client},
        )

    proxied = running(app, **proxy_options("127.0.0.1"))
    with proxied as base, caplog.at_level(logging.WARNING, logger="kohya_backend.service.login_limit"):
        for _ in range(FREE_FAILURES + 1):
            assert login("10.0.0.5", "wrong").status_code in (400, 401)
        blocked = login("10.0.0.5", TOKEN)  # even the right password waits: guessing gains nothing
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= BASE_WAIT_S
        assert login("10.0.0.6", TOKEN).status_code == 200  # another client is not held up
        clock.now += BASE_WAIT_S
        assert login("10.0.0.5", TOKEN).status_code == 200
        assert login("10.0.0.5", "wrong").status_code in (400, 401)  # the success started the count over
        assert login("10.0.0.5", "wrong").status_code in (400, 401)
    failures = [r.getMessage() for r in caplog.records if "failed login" in r.getMessage()]
    assert len(failures) == FREE_FAILURES + 3 and all("10.0.0.5" in m for m in failures)
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_without_a_named_proxy_a_client_cannot_claim_other_addresses(tmp_path: Path) -> None:
    """uvicorn believes X-Forwarded-For from 127.0.0.1 by default: any local process could give each guess a
    fresh address. serve's default believes no one, and a named proxy only for what that proxy sends."""
    clock = Clock()
    app = build_app(build_service(tmp_path / "home"), token=TOKEN, logins=LoginLimiter(clock=clock))
    assert proxy_options(None) == proxy_options(" , ") == {"proxy_headers": False}
    with running(app, **proxy_options(None)) as base:
        statuses = [
            httpx.post(f"{base}/login", data={"username": "me", "password": "wrong"},
                       headers={"X-Forwarded-For": f"10.0.0.{n}"}).status_code
            for n in range(FREE_FAILURES + 2)
        ]  # fmt: skip
        assert statuses[-1] == 429 and 429 not in statuses[: FREE_FAILURES + 1]
    with running(app, **proxy_options("127.0.0.2")) as base, stranger("127.0.0.3") as other:
        for n in range(FREE_FAILURES + 2):  # not the named proxy: its header is not believed either
            answer = other.post(
                f"{base}/login",
                data={"username": "me", "password": "wrong"},
                headers={"X-Forwarded-For": f"10.1.0.{n}"},
            )
        assert answer.status_code == 429


def _burst(throttle_limiter: LoginLimiter, clients: list[str]) -> tuple[list[int], int]:
    """Logins sent all at once (one per entry of `clients`, the address each comes from), every one let through
    held by the login route until all are either there or refused; (the statuses, how many reached the route)."""
    reached: list[str] = []

    async def run() -> list[int]:
        all_in = asyncio.Event()
        refused = 0

        async def login_route(scope: Any, receive: Any, send: Any) -> None:
            reached.append(scope["client"][0])
            if len(reached) + refused == len(clients):
                all_in.set()
            await all_in.wait()  # no answer before every attempt of the burst has been let in or refused
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"Incorrect credentials."})

        throttle = LoginThrottle(login_route, limiter=throttle_limiter)

        async def one(address: str) -> int:
            nonlocal refused
            sent: list[dict[str, Any]] = []

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/login",
                "headers": [],
                "client": (address, 1),
            }
            await throttle(scope, receive, send)
            status = int(sent[0]["status"])
            if status == 429:
                refused += 1
                if len(reached) + refused == len(clients):
                    all_in.set()
            return status

        return list(await asyncio.gather(*(one(address) for address in clients)))

    loop = (
        asyncio.new_event_loop()
    )  # not the thread's loop: gradio 4 (later tests) needs the main thread loopless
    try:
        statuses = loop.run_until_complete(asyncio.wait_for(run(), 30))
    finally:
        loop.close()
    return statuses, len(reached)


def test_logins_sent_all_at_once_earn_the_same_back_off() -> None:
    """A burst of guesses, all sent before the first answer: only the free ones and one more reach the check."""
    statuses, reached = _burst(LoginLimiter(clock=Clock()), ["10.0.0.5"] * 40)
    assert reached == FREE_FAILURES + 1
    assert sorted(statuses) == [400] * (FREE_FAILURES + 1) + [429] * (40 - FREE_FAILURES - 1)
    # Each address of one IPv6 /64 is the same client; another /64 and IPv4 clients are others.
    net = [f"2001:db8:0:1::{n:x}" for n in range(1, 41)]
    statuses, reached = _burst(LoginLimiter(clock=Clock()), [*net, "2001:db8:0:2::1", "10.0.0.6"])
    assert reached == FREE_FAILURES + 1 + 2 and statuses[-2:] == [400, 400]


def test_the_api_token_backs_off_per_client_together_with_the_login(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bearer token is the login's password: a client's refused tokens and failed logins count together, and
    after a few that client waits (429, Retry-After) whatever it sends; another client's right token never does."""
    clock = Clock()
    app = build_app(build_service(tmp_path / "home"), token=TOKEN, logins=LoginLimiter(clock=clock))
    good = {"Authorization": f"Bearer {TOKEN}"}
    with running(app) as base, stranger() as guesser, caplog.at_level(logging.WARNING):
        api = f"{base}{API_PREFIX}/trainings"
        assert guesser.post(f"{base}/login", data={"username": "me", "password": "wrong"}).status_code in (
            400,
            401,
        )
        for n in range(FREE_FAILURES):
            assert guesser.get(api, headers={"Authorization": f"Bearer guess-{n}"}).status_code == 401
        refused = guesser.get(api, headers=good)  # even the right token waits: guessing gains nothing
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= BASE_WAIT_S
        assert refused.json()["detail"]["error"] == "TooManyFailures"
        assert guesser.post(f"{base}/login", data={"username": "me", "password": TOKEN}).status_code == 429
        assert httpx.get(api, headers=good).status_code == 200  # another client is not held up
        assert httpx.get(f"{base}{API_PREFIX}/version").status_code == 200  # open paths count nothing
        clock.now += BASE_WAIT_S
        assert guesser.get(api, headers=good).status_code == 200
        for n in range(FREE_FAILURES + 1):  # the success started the count over
            assert guesser.get(api, headers={"Authorization": f"Bearer again-{n}"}).status_code == 401
    refusals = [r.getMessage() for r in caplog.records if "failed API token from 127.0.0.2" in r.getMessage()]
    assert len(refusals) == 2 * FREE_FAILURES + 1


def test_tokens_guessed_all_at_once_earn_the_same_back_off() -> None:
    """A burst of guesses, all sent before the first answer: each counts the moment it is checked."""

    async def route(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = BearerTokenMiddleware(
        route, token=TOKEN, open_paths=frozenset(), limiter=LoginLimiter(clock=Clock())
    )

    async def one(n: int, address: str) -> int:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            await asyncio.sleep(0)  # every other request of the burst gets its turn before this answer goes
            sent.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        token = TOKEN if n < 0 else f"guess-{n}"
        headers = [(b"authorization", f"Bearer {token}".encode())]
        scope = {"type": "http", "method": "GET", "path": "/x", "headers": headers, "client": (address, 1)}
        await guard(scope, receive, send)
        return int(sent[0]["status"])

    async def burst() -> list[int]:
        guesses = [one(n, "10.0.0.5") for n in range(40)]
        return list(await asyncio.gather(*guesses, one(-1, "10.0.0.6"), one(-1, "10.0.0.5")))

    loop = (
        asyncio.new_event_loop()
    )  # not the thread's loop: gradio 4 (later tests) needs the main thread loopless
    try:
        statuses = loop.run_until_complete(asyncio.wait_for(burst(), 30))
    finally:
        loop.close()
    assert sorted(statuses[:40]) == [401] * (FREE_FAILURES + 1) + [429] * (40 - FREE_FAILURES - 1)
    assert statuses[40:] == [200, 429]  # another client's token passes; the guesser's own right token waits


def test_what_a_clients_failures_count_under() -> None:
    assert client_key("10.0.0.5") == "10.0.0.5"
    assert client_key("::ffff:10.0.0.5") == "10.0.0.5"  # IPv4 on a dual-stack socket
    assert (
        client_key("2001:db8:0:1:aaaa:bbbb:cccc:dddd") == client_key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    )
    assert client_key("2001:db8:0:2::1") != client_key("2001:db8:0:1::1")
    assert client_key("::1") == "::1" and client_key("testclient") == "testclient"


def test_serves_flags_make_its_guard_and_stall_time() -> None:
    from kohya_backend.cli import build_parser
    from kohya_backend.ui.standalone import serve_policy

    args = build_parser().parse_args(
        ["serve", "--allowed-hosts", "box.lan,proxy.example", "--cors-allow-origins", "http://tools.example:3000",
         "--cors-allow-origins-regex", r"https://.*\.example", "--stall-minutes", "2.5"]
    )  # fmt: skip
    assert args.stall_minutes == 2.5
    policy = serve_policy(
        "127.0.0.1",
        allowed_hosts=tuple(args.allowed_hosts),
        cors_allow_origins=tuple(args.cors_allow_origins),
        cors_allow_origins_regex=args.cors_allow_origins_regex,
    )
    assert policy.host_allowed("box.lan:7861") and policy.host_allowed("proxy.example")
    assert not policy.host_allowed("other.lan:7861")
    assert policy.origins == ("http://tools.example:3000",) and policy.origin_regex == r"https://.*\.example"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--stall-minutes", "0"])
    with pytest.raises(TrainManagementError, match="is not an origin"):
        serve_policy("127.0.0.1", cors_allow_origins=("tools.example",))


GRADIO_ROUTES = ("/run/predict", "/api/predict", "/queue/join", "/reset", "/upload")


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "token"])
def test_other_sites_cannot_drive_the_tabs_gradio_routes(tmp_path: Path, token: str | None) -> None:
    """What runs the tab's buttons (gradio's predict, queue and upload routes, outside the API prefix) is guarded
    like the API: a simple request from another site (an untyped or form body needs no preflight) never reaches
    gradio, on the open app and behind the login alike; the app's own page does."""
    app = build_app(build_service(tmp_path / "home"), token=token)
    body = b'{"fn_index": 0, "data": [], "session_hash": "x"}'
    with running(app) as base:
        for path in GRADIO_ROUTES:
            for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                            {"Referer": "http://evil.example/page"}, {"Origin": "http://127.0.0.1:1"}):  # fmt: skip
                answer = httpx.post(base + path, content=body, headers=headers)
                assert answer.status_code == 403, (path, headers, answer.text)
                assert answer.json()["detail"]["error"] == "ForeignOrigin"
            upload = httpx.post(
                base + path, files={"files": ("a.txt", b"x")}, headers={"Origin": "http://evil.example"}
            )
            assert upload.status_code == 403, (path, upload.text)
            own = httpx.post(base + path, content=body, headers={"Origin": base})
            assert own.status_code != 403, (path, own.text)  # gradio's own answer, whatever it is


def test_no_cors_for_other_origins_on_either_gradio_line(tmp_path: Path) -> None:
    """gradio 3.41 answers preflights with `*`, gradio 4 with any localhost origin: neither reaches the browser."""
    from kohya_backend.ui.standalone import serve_policy

    policy = serve_policy("127.0.0.1", cors_allow_origins=("http://127.0.0.1:3000",))
    app = build_app(build_service(tmp_path / "home"), policy=policy)
    with running(app) as base:
        for path in (f"{API_PREFIX}/trainings", f"{API_PREFIX}/workers", "/queue/join", "/run/predict"):
            for origin, allowed in (("http://127.0.0.1:1", False), ("http://evil.example", False),
                                    ("http://127.0.0.1:3000", True)):  # fmt: skip
                preflight = httpx.options(
                    base + path,
                    headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                             "Access-Control-Request-Headers": "content-type"},
                )  # fmt: skip
                given = preflight.headers.get("access-control-allow-origin")
                assert given == (origin if allowed else None), (path, origin, given)
        page = httpx.get(base + "/", headers={"Origin": "http://127.0.0.1:1"})
        assert page.status_code == 200 and "access-control-allow-origin" not in page.headers
