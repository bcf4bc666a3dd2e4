"""Login rate limiting for the standalone app's gradio login page (and, through service/auth.py, for bearer
tokens): per client, exponential back-off, logged.

gradio's login route calls the password check with the user name and password only, so the client is known only
here, in front of it: an ASGI middleware that counts the route's attempts per client address and, after a few
failures, answers 429 (with Retry-After) until the back-off has passed, without asking gradio. An attempt counts
as failed from the moment it is let through until it succeeds, so that attempts sent all at once earn the back-off
of attempts sent one after another. An IPv6 client counts by its /64, which one machine commonly holds whole.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

FREE_FAILURES = 3  # failures allowed before the first wait
BASE_WAIT_S = 2.0
MAX_WAIT_S = 15 * 60.0
MAX_CLIENTS = 10_000  # clients remembered at once (the oldest is forgotten first)
LOGIN_PATHS = ("/login", "/login/")


@dataclass
class _Record:
    failures: int = 0
    blocked_until: float = 0.0


class LoginLimiter:
    """Failed logins per client and the back-off they earn: none for the first FREE_FAILURES, then BASE_WAIT_S
    doubling with each further failure, at most MAX_WAIT_S. A success forgets the client's failures."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Seconds `client` must wait before its next attempt (0: it may try now)."""
        with self._lock:
            return self._wait(client)

    def attempt(self, client: str) -> float:
        """Let an attempt of `client` through (0), or the seconds it must wait first. One let through counts as
        failed at once, until `succeeded` forgets it: else every attempt of a burst would pass before any failed."""
        with self._lock:
            wait = self._wait(client)
            if wait == 0:
                self._count(client)
        return wait

    def failed(self, client: str, *, counted: bool = False, what: str = "login") -> float:
        """Record a failed login (`counted`: its `attempt` has counted it already) and log it as a failed `what`;
        the wait it earns (0 while within the free failures)."""
        with self._lock:
            record = self._records.get(client) if counted else None
            if record is None:
                record = self._count(client)
            failures, wait = record.failures, self._wait(client)
        log.warning(
            "Train Management: failed %s from %s (%d in a row)%s",
            what,
            client,
            failures,
            f"; its next attempt is refused for {wait:.0f} s" if wait else "",
        )
        return wait

    def succeeded(self, client: str) -> None:
        """Forget the client's failures."""
        with self._lock:
            self._records.pop(client, None)

    def _wait(self, client: str) -> float:
        record = self._records.get(client)
        return max(0.0, record.blocked_until - self.clock()) if record else 0.0

    def _count(self, client: str) -> _Record:
        """One more failure of `client` and the back-off it earns (the lock held)."""
        record = self._records.pop(client, None) or _Record()
        self._records[client] = record
        while len(self._records) > MAX_CLIENTS:
            self._records.popitem(last=False)
        record.failures += 1
        extra = record.failures - FREE_FAILURES
        wait = min(MAX_WAIT_S, BASE_WAIT_S * 2 ** (extra - 1)) if extra > 0 else 0.0
        record.blocked_until = self.clock() + wait
        return record


def client_key(address: str) -> str:
    """What a client's failures count under: its IPv4 address (also when IPv4-mapped), or its IPv6 /64 network, of
    which a machine commonly holds every address (a fresh count per address would be no limit at all)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def scope_client(scope: Scope) -> str:
    """The client an ASGI request counts under (client_key of its address; uvicorn's, after any trusted proxy's
    X-Forwarded-For)."""
    client = scope.get("client")
    return client_key(str(client[0])) if client else "unknown"


def retry_after(wait_s: float) -> bytes:
    """A Retry-After header's value for a wait: whole seconds, rounded up past it."""
    return str(int(wait_s) + 1).encode()


class LoginThrottle:
    """ASGI middleware: applies a LoginLimiter to POSTs to the login route of the app it wraps."""

    def __init__(self, app: ASGIApp, *, limiter: LoginLimiter, paths: tuple[str, ...] = LOGIN_PATHS) -> None:
        self.app = app
        self.limiter = limiter
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        client = scope_client(scope)
        wait = self.limiter.attempt(client)
        if wait > 0:
            log.warning("Train Management: login from %s refused, %.0f s of back-off left", client, wait)
            body = b'{"detail": "Too many failed logins: wait before trying again."}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 429,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", retry_after(wait))],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                if int(message["status"]) < 400:
                    self.limiter.succeeded(client)
                else:  # wrong credentials (400 on gradio), or a malformed form: an attempt all the same
                    self.limiter.failed(client, counted=True)
            await send(message)

        await self.app(scope, receive, watch)
