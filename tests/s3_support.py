"""moto's S3 server on 127.0.0.1 over real HTTP (boto3 unchanged, pointed at it with AWS_ENDPOINT_URL and dummy
credentials), a TCP proxy in front of it that sees every request, can cut a response mid-body or drop the Range
header (a store that ignores Range), and a broken store that answers every GET with an empty 200."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from kohya_backend.storage.client import S3Client

REGION = "us-east-1"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """The base URL of one moto server for the whole test session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> str:
    """This process (and the children it starts) talk to moto through boto3's standard chain."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": moto_url}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TRAIN_MANAGEMENT_S3_CACHE", str(tmp_path / "s3-cache"))
    return moto_url


def new_bucket(endpoint: str) -> str:
    """A fresh bucket on the server (unique per test, so tests never see each other's objects)."""
    name = f"tm-{uuid.uuid4().hex[:16]}"
    raw_client(endpoint).create_bucket(Bucket=name)
    return name


def raw_client(endpoint: str) -> Any:
    """A plain boto3 client for putting test objects in place (what `aws s3 cp` would do)."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def client_via(endpoint: str, **options: Any) -> S3Client:
    """The project's S3Client talking to `endpoint` (e.g. a proxy)."""
    return S3Client(raw_client(endpoint), **options)


def set_auth(endpoint: str, unauthenticated_actions: float) -> None:
    """moto checks credentials (access key, signature, IAM policy) for every request after this many."""
    answer = httpx.post(f"{endpoint}/moto-api/reset-auth", content=str(unauthenticated_actions))
    answer.raise_for_status()


@dataclass
class Proxy:
    """A TCP proxy to `upstream` that records each request head, can cut one GET response after N bytes, and with
    `strip_range` removes every Range header before it reaches the store (which then sends whole objects)."""

    upstream: tuple[str, int]
    cut_path: str | None = None
    cut_after: int = 0
    strip_range: bool = False
    requests: list[str] = field(default_factory=list)
    downstream_bytes: int = 0
    cuts: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def ranges(self) -> list[str]:
        """The Range headers of the GETs seen, in order ('' for a GET without one)."""
        out = []
        for head in self.requests:
            if head.startswith("GET "):
                found = re.search(r"(?im)^range:\s*(\S+)", head)
                out.append(found.group(1) if found else "")
        return out

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            state = {"cut": False, "counted": 0}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict[str, Any]) -> None:
        try:
            while data := client.recv(65536):
                text = data.decode("latin-1")
                for head in re.findall(
                    r"(?:GET|PUT|HEAD|POST|DELETE) [^\r\n]* HTTP/1\.1\r\n(?:[^\r\n]+\r\n)*", text
                ):
                    with self._lock:
                        self.requests.append(head)
                        if self.cut_path and head.startswith(f"GET {self.cut_path}"):
                            state["cut"], state["counted"] = True, 0
                            self.cut_path = None
                if self.strip_range:
                    data = re.sub(rb"(?im)^range:[^\r\n]*\r\n", b"", data)
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, state: dict[str, Any]) -> None:
        try:
            while data := upstream.recv(65536):
                if state["cut"]:
                    room = self.cut_after - state["counted"]
                    if len(data) >= room:
                        client.sendall(data[:room])
                        with self._lock:
                            self.downstream_bytes += room
                            self.cuts += 1
                        break  # drop the connection in the middle of the body
                    state["counted"] += len(data)
                client.sendall(data)
                with self._lock:
                    self.downstream_bytes += len(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class EmptyStore:
    """An HTTP server that answers the first `empty_answers` GETs with 200 and no body (and an ETag), and every later
    one with 500: a broken store, or a proxy that drops bodies."""

    def __init__(self, empty_answers: int = 20) -> None:
        store = self
        self.gets = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                store.gets += 1
                self.send_response(200 if store.gets <= empty_answers else 500)
                self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
