"""Text a request may not carry: JSON strings with lone surrogates (`"\\ud800"`), which are valid JSON but not
Unicode, so that every later step (SQLite, file names, UTF-8 logs) would fail with a 500. Refused with 400 naming
the field, before the route runs.

Other inputs need no check: form fields, file names, paths and queries are decoded from bytes by Starlette and
uvicorn, which replace (or fall back to Latin-1 for) what is not UTF-8, so they never hold a lone surrogate.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _field(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "the body"


def _bad_at(text: str) -> int | None:
    """The index of the first character of `text` that UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def find_bad_text(value: Any, path: list[str | int] | None = None) -> tuple[str, int, str] | None:
    """The first string in a JSON value (keys included) that is not valid Unicode: (field, index, character)."""
    path = path or []
    if isinstance(value, str):
        index = _bad_at(value)
        return None if index is None else (_field(path), index, value[index])
    if isinstance(value, dict):
        for key, item in value.items():
            index = _bad_at(key)
            if index is not None:
                return (f"a key in {_field(path)}", index, key[index])
            found = find_bad_text(item, [*path, key])
            if found:
                return found
    if isinstance(value, list):
        for number, item in enumerate(value):
            found = find_bad_text(item, [*path, number])
            if found:
                return found
    return None


def _too_deep() -> Response:
    detail = {
        "error": "InvalidBody",
        "message": "the JSON body nests arrays or objects too deeply to be read",
        "hint": "send the body as the API documents it (no field nests more than a few levels)",
    }
    return JSONResponse({"detail": detail}, status_code=400)


def bad_text_answer(raw: bytes) -> Response | None:
    """The 400 answer for a JSON body holding invalid text, or nested too deeply for Python's JSON reader (which
    raises RecursionError, a 500 if let through); None when it holds neither, or is no JSON at all: the route's
    own parsing answers that."""
    try:
        data = json.loads(raw)
        found = find_bad_text(data)
    except RecursionError:
        return _too_deep()
    except ValueError:
        return None
    if found is None:
        return None
    field, index, char = found
    detail = {
        "error": "InvalidText",
        "message": f"{field} is not valid Unicode text: character {index + 1} is a lone surrogate "
        f"(\\u{ord(char):04x}) that cannot be stored or written to a file",
        "hint": f"send {field} as UTF-8 text (a surrogate pair must come whole)",
        "field": field,
    }
    return JSONResponse({"detail": detail}, status_code=400)


class TextCheckedRoute(APIRoute):
    """An APIRoute that refuses a JSON body with invalid text (bad_text_answer) before FastAPI parses it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if request.method in _BODY_METHODS and (
                kind in ("", "application/json") or kind.endswith("+json")
            ):
                answer = bad_text_answer(await request.body())  # kept by the request: FastAPI reads it again
                if answer is not None:
                    return answer
            return await handler(request)

        return checked
