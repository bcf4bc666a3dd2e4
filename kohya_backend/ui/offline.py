"""The standalone page asks nothing of other hosts: gradio's page template (3.41 and 4.x) loads iframe-resizer
from cdnjs and preconnects to Google Fonts. This ASGI middleware takes those tags out of the HTML the app serves
(the tab's theme already uses the machine's fonts, compat.offline_theme). No gradio import here."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

# The tags gradio's index.html carries for other hosts: a <script src="https://..."></script> (iframe-resizer,
# only for pages embedded in another site) and <link rel="preconnect" href="https://fonts..."> (for Google Fonts).
_OFFSITE = re.compile(
    rb"<script[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>"
    rb"|<link[^>]*\brel=\"preconnect\"[^>]*\bhref=\"https?://[^\"]*\"[^>]*/?>",
    re.IGNORECASE | re.DOTALL,
)
MAX_PAGE_BYTES = 4 << 20  # gradio's page is a few KiB; anything larger passes untouched


def strip_offsite(html: bytes) -> bytes:
    """The page without tags that load from, or connect to, another host."""
    return _OFFSITE.sub(b"", html)


class OfflinePage:
    """Serve HTML pages without the tags of strip_offsite; every other response passes as it is."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()
        passing = False

        async def buffered(message: Message) -> None:
            nonlocal start, passing
            if message["type"] == "http.response.start":
                named = {k.lower(): v for k, v in message.get("headers", [])}
                html = named.get(b"content-type", b"").startswith(b"text/html")
                size = int(named.get(b"content-length", b"0") or 0)
                if not html or b"content-encoding" in named or size > MAX_PAGE_BYTES:
                    passing = True
                    await send(message)
                    return
                start = message
                return
            if passing or start is None:
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            page = strip_offsite(bytes(body))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(page)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": page, "more_body": False})

        await self.app(scope, receive, buffered)
