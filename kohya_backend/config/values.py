"""Small helpers for config values: the problem a bad value raises, how a value is shown, and kohya's
"name=value" argument lists."""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from typing import Any


class ValueProblem(Exception):
    """A value that cannot be used for its key; message and hint go into a ConfigIssue."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def shown(value: Any) -> str:
    """A value as a user would write it in TOML (strings in double quotes)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def kv_dict(items: Sequence[str]) -> dict[str, str]:
    """["name=value", ...] as {name: value string}."""
    return dict(item.split("=", 1) for item in items)


def literal_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """kohya's ["name=value", ...] as keyword arguments, each value read as a Python literal (ast.literal_eval), as
    sd-scripts reads optimizer_args and lr_scheduler_args: "betas=0.9,0.99" is the tuple (0.9, 0.99).

    Raises ValueProblem naming the first entry that is not name=<literal>.
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name.isidentifier():
            raise ValueProblem(f"{item!r} is not of the form name=value", 'write e.g. "weight_decay=0.01"')
        try:
            out[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueProblem(
                f"{name}={raw}: the value is not a Python literal, which kohya requires",
                f"quote text as {name}='{raw}'; numbers, True/False and tuples such as 0.9,0.999 need no quotes",
            ) from None
    return out
