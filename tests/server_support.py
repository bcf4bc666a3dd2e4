"""A real uvicorn server on a free 127.0.0.1 port, in a thread, for tests on both gradio/pydantic lines."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

STRANGER = "127.0.0.2"  # on Linux every 127.0.0.0/8 address is this machine's


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stranger(address: str = STRANGER) -> httpx.Client:
    """An HTTP client that connects from another loopback address than the tests' own clients: another client to
    a server, whose refused tokens earn it a back-off of its own (service/login_limit.py), not the tests'."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


@contextmanager
def running(app: Any, **options: Any) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 until the block ends (`options`: more uvicorn.Config arguments); yields its base
    URL (http://127.0.0.1:PORT)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
