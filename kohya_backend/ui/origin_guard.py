"""Only the page's own origin (or one the user allowed) may change anything through the tab's events.

Inside the WebUI the tab's buttons run through gradio's own routes on the WebUI's app (POST /run/predict, the
queue's WebSocket on 3.41, POST /queue/join on 4.x), which check no Origin: any website the user visits could
press them through the user's browser. The WebUI's app is not ours to guard as a whole (a proxy that rewrites Host
would lose the whole WebUI), so each state-changing event checks, as it runs, where its request came from
(service/guard.py's rule: the Origin, else the Referer, against the Host's origin and the allowed ones) and
refuses a foreign one with gr.Error, before its handler runs.

guard_events() wraps every event of a Blocks once it is wired: an event added later is guarded unless its
handler is marked @read_only (it changes nothing and starts nothing).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import gradio as gr
from gradio.utils import get_type_hints
from starlette.requests import HTTPConnection

from kohya_backend.service.guard import GuardPolicy, foreign_origin

F = TypeVar("F", bound=Callable[..., Any])
READ_ONLY = "_train_management_read_only"
GUARDED = "_train_management_origin_checked"
HINT = (
    "Use the tab from its own page. If you open it through another address (a reverse proxy, a tunnel), allow "
    "that address: --cors-allow-origins https://that.address (in the WebUI, --train-allowed-hosts its-name "
    "also does)."
)


def read_only(fn: F) -> F:
    """Mark an event handler that changes nothing and starts nothing: guard_events leaves it open."""
    setattr(fn, READ_ONLY, True)
    return fn


def _handlers(fn: Any) -> Iterator[Any]:
    """`fn` and what it wraps (functools.wraps, or gradio 3.41's `every=` loop around its `fn`)."""
    for _ in range(8):
        if fn is None:
            return
        yield fn
        code = getattr(fn, "__code__", None)
        cells = getattr(fn, "__closure__", None) or ()
        inner = getattr(fn, "__wrapped__", None)
        if inner is None and code is not None and "fn" in code.co_freevars:
            inner = cells[code.co_freevars.index("fn")].cell_contents
        fn = inner


def is_read_only(fn: Any) -> bool:
    """Whether an event function is (or wraps) a handler marked @read_only."""
    return any(getattr(f, READ_ONLY, False) for f in _handlers(fn))


def is_guarded(fn: Any) -> bool:
    """Whether an event function checks its request's origin (guard_events wrapped it)."""
    return bool(getattr(fn, GUARDED, False))


def _queued_event_headers() -> Mapping[str, str] | None:
    """gradio 3.41: the headers of the queue WebSocket whose event is running in this thread.

    3.41's queue hands an event's request to the function as a plain dict carried in the body of an internal
    POST /api/predict, and that route takes such a dict from any client's body too: so the headers are read from
    the live event's own WebSocket, found by the event id gradio set for this thread, and a request that matches
    no live event is not trusted."""
    try:
        from gradio.context import thread_data
    except ImportError:
        return None
    event_id = getattr(thread_data, "event_id", None)
    queue = getattr(getattr(thread_data, "blocks", None), "_queue", None)
    if event_id is None or queue is None:
        return None
    for job in getattr(queue, "active_jobs", None) or ():
        for event in job or ():
            socket = getattr(event, "websocket", None)
            if getattr(event, "_id", None) == event_id and isinstance(socket, HTTPConnection):
                return socket.headers
    return None


def request_headers(request: Any) -> Mapping[str, str] | None:
    """The headers of the HTTP request or WebSocket behind a gr.Request (both gradio lines); None when they
    cannot be told (a 3.41 request dict that no live queue event stands behind)."""
    inner = vars(request).get("request")  # not getattr: 3.41's Request looks unknown names up in its kwargs
    if isinstance(inner, HTTPConnection):
        return inner.headers
    return _queued_event_headers()


def origin_refusal(request: Any, policy: GuardPolicy) -> str | None:
    """Why an event must not run for `request` (None: it may). No request at all is a call from Python in this
    process (not through gradio's routes), which may."""
    if request is None:
        return None
    headers = request_headers(request)
    if headers is None:
        return f"Refused: where this request came from cannot be told, so it may not change anything here. {HINT}"
    shown = foreign_origin(headers, policy)
    if shown is None:
        return None
    return f"Refused: a request from {shown} may not change anything here: it is not this page. {HINT}"


def _is_special(param: inspect.Parameter, hint: Any) -> bool:
    """Whether gradio fills `param` itself (a Request, event data, progress) instead of from an input."""
    if isinstance(param.default, gr.Progress) or hint is gr.Request:
        return True
    return inspect.isclass(hint) and issubclass(hint, gr.EventData)


def _call_shape(fn: Callable[..., Any], n_inputs: int) -> tuple[list[inspect.Parameter], int | None]:
    """(the positional parameters of `fn` that gradio fills for an event with `n_inputs` inputs, the index of its
    own gr.Request parameter among them or None).

    gradio inserts its special values at their parameters' places and binds the inputs to the others in order;
    parameters left over keep their defaults, so the wrapper's signature stops before them (a request parameter
    after them would be handed an input's place)."""
    hints = get_type_hints(fn)
    kept: list[inspect.Parameter] = []
    own = None
    left = n_inputs
    for param in inspect.signature(fn).parameters.values():
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break
        special = _is_special(param, hints.get(param.name))
        if not special and left == 0:
            break
        if hints.get(param.name) is gr.Request and own is None:
            own = len(kept)
        left -= 0 if special else 1
        kept.append(param)
    if left > 0:
        raise TypeError(f"{fn!r} takes fewer positional parameters than its event's {n_inputs} input(s)")
    return kept, own


def guarded(fn: Callable[..., Any], policy: GuardPolicy, n_inputs: int) -> Callable[..., Any]:
    """`fn` as an event function that first refuses (gr.Error) a request from a foreign origin; gradio hands it the
    gr.Request (its own parameter when `fn` has one, else one added last, None when called from Python)."""
    params, own = _call_shape(fn, n_inputs)
    added = own is None
    if added:
        request_param = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
        params = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params] + [request_param]
    where = len(params) - 1 if own is None else own

    name = params[where].name

    def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The arguments for `fn` once the request they carry may act (else gr.Error)."""
        if len(args) > where:
            request = args[where]
            if added:
                args = args[:where] + args[where + 1 :]
        else:
            request = kwargs.pop(name, None) if added else kwargs.get(name)
        refusal = origin_refusal(request, policy)
        if refusal is not None:
            raise gr.Error(refusal)
        return args

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*check(args, kwargs), **kwargs)

    def generate(*args: Any, **kwargs: Any) -> Any:
        yield from fn(*check(args, kwargs), **kwargs)

    async def call_async(*args: Any, **kwargs: Any) -> Any:
        return await fn(*check(args, kwargs), **kwargs)

    async def generate_async(*args: Any, **kwargs: Any) -> Any:
        async for item in fn(*check(args, kwargs), **kwargs):
            yield item

    # gradio tells generators and coroutines apart by the function it is given: the wrapper is of fn's kind.
    wrapper: Callable[..., Any] = call
    if inspect.isasyncgenfunction(fn):
        wrapper = generate_async
    elif inspect.iscoroutinefunction(fn):
        wrapper = call_async
    elif inspect.isgeneratorfunction(fn):
        wrapper = generate
    functools.update_wrapper(wrapper, fn)
    annotations = dict(getattr(fn, "__annotations__", {}))  # a copy: update_wrapper shared fn's own dict
    annotations[name] = gr.Request
    wrapper.__annotations__ = annotations
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    setattr(wrapper, GUARDED, True)
    return wrapper


def guard_events(blocks: Any, policy: GuardPolicy) -> int:
    """Wrap every event function of `blocks` that is not @read_only with the origin check of `policy` (once);
    the number wrapped."""
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns  # 4.x keys them by id
    count = 0
    for block_fn in fns:
        fn = block_fn.fn
        if fn is None or is_guarded(fn) or is_read_only(fn):
            continue
        n_inputs = 1 if block_fn.inputs_as_dict else len(block_fn.inputs)
        block_fn.fn = guarded(fn, policy, n_inputs)
        count += 1
    return count
