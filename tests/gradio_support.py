"""Drive a served gradio app's events the way a browser page does, on both gradio lines: a direct POST to
/run/predict, and the queue (3.41: a WebSocket at /queue/join; 4.x: POST /queue/join, then the answer streamed
from /queue/data). Bodies go untyped, as another site's page can send them without asking first."""

from __future__ import annotations

import json
from importlib.metadata import version
from typing import Any

import httpx

GRADIO_MAJOR = int(version("gradio").split(".")[0])


def event_index(blocks: Any, elem_id: str, event: str = "click") -> int:
    """The fn_index of the first `event` on the component `elem_id` (3.41: its place in the list; 4.x: its id)."""
    target = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)._id
    for i, dep in enumerate(blocks.config["dependencies"]):
        targets = [
            tuple(t) if isinstance(t, (list, tuple)) else (t, dep.get("trigger")) for t in dep["targets"]
        ]
        if (target, event) in targets:
            return int(dep.get("id", i))
    raise KeyError(f"no {event} event on {elem_id}")


def predict(
    base: str, fn_index: int, data: list[Any], headers: dict[str, str], **extra: Any
) -> httpx.Response:
    """POST /run/predict (`extra` joins the body: e.g. 3.41's `request`)."""
    body = {"fn_index": fn_index, "data": data, "session_hash": "predict-session", **extra}
    return httpx.post(f"{base}/run/predict", content=json.dumps(body).encode(), headers=headers, timeout=60)


def queued(
    base: str, fn_index: int, data: list[Any], origin: str, session: str = "queue-session"
) -> dict[str, Any]:
    """Run one event through the queue as a page of `origin` would; the queue's last message (its `success`,
    `output`)."""
    if GRADIO_MAJOR < 4:
        return _queued_websocket(base, fn_index, data, origin, session)
    return _queued_sse(base, fn_index, data, origin, session)


def _queued_websocket(base: str, fn_index: int, data: list[Any], origin: str, session: str) -> dict[str, Any]:
    from websockets.sync.client import connect

    url = base.replace("http://", "ws://") + "/queue/join"
    with connect(url, origin=origin, open_timeout=30) as socket:  # type: ignore[arg-type]
        while True:
            message = json.loads(socket.recv(timeout=60))
            if message["msg"] == "send_hash":
                socket.send(json.dumps({"fn_index": fn_index, "session_hash": session}))
            elif message["msg"] == "send_data":
                body = {"fn_index": fn_index, "session_hash": session, "data": data, "event_data": None}
                socket.send(json.dumps(body))
            elif message["msg"] == "process_completed":
                return dict(message)


def _queued_sse(base: str, fn_index: int, data: list[Any], origin: str, session: str) -> dict[str, Any]:
    body = {"fn_index": fn_index, "session_hash": session, "data": data, "event_data": None}
    headers = {"Origin": origin}
    joined = httpx.post(f"{base}/queue/join", content=json.dumps(body).encode(), headers=headers, timeout=60)
    joined.raise_for_status()
    with httpx.stream("GET", f"{base}/queue/data", params={"session_hash": session}, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return dict(message)
    raise AssertionError("the queue ended without completing the event")
