"""Every event of the tab that changes anything checks its request's origin (ui/origin_guard.py), on the installed
gradio line: which events are guarded, that each refuses another site before its handler runs, and how the
request reaches the check on each line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from gradio.helpers import special_args
from starlette.requests import Request

from kohya_backend.service.app import build_service
from kohya_backend.service.datasets import DatasetService
from kohya_backend.service.guard import GuardPolicy
from kohya_backend.service.training import TrainingService
from kohya_backend.ui.origin_guard import guard_events, guarded, is_guarded, is_read_only, origin_refusal
from kohya_backend.ui.tab import create_tab

PAGE = "127.0.0.1:7860"
# Every handler that writes, deletes, sends or starts work; each must be guarded.
STATE_CHANGING = {
    "submit", "save", "delete", "add", "remove", "cancel", "resume", "continue_training", "create", "validate",
    "health", "save_caption", "generate_caption", "delete_image", "delete_dataset", "upload_dataset",
    "upload_model",
}  # fmt: skip
# The handlers left open: they only read, fill the editor or ask a question. Marking another one @read_only is a
# decision this list has to be changed for.
READ_ONLY = {
    "instance_choices", "model_choices", "dataset_choices", "model_info", "fm_changed", "instance_changed",
    "reset_config", "apply_fill", "dismissed", "format_config", "key_help", "load", "import_kohya", "ask_delete",
    "refresh", "select_row", "details", "duplicate", "lora_prompt", "finished", "choices", "open",
    "pick_thumbnail", "select_image", "ask_delete_image", "ask_delete_dataset", "page_load", "poll_marks",
}  # fmt: skip


@pytest.fixture
def service(tmp_path: Path) -> TrainingService:
    return build_service(tmp_path / "home")


def _event_fns(blocks: Any) -> list[Any]:
    """(BlockFunction) of every event with a server-side function (3.41 lists them, 4.x keys them by id)."""
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    return [f for f in fns if f.fn is not None]


def _name(fn: Any) -> str:
    """The handler's name (gradio 3.41's `every=` loop wraps the poll: read its inner function's)."""
    from kohya_backend.ui.origin_guard import _handlers

    return str([getattr(f, "__name__", "") for f in _handlers(fn)][-1])


def _request(headers: dict[str, str]) -> gr.Request:
    """A gr.Request over a real starlette request with these headers (the Host is the page's)."""
    raw = [(b"host", PAGE.encode())] + [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return gr.Request(request=Request({"type": "http", "method": "POST", "path": "/", "headers": raw}))


def test_every_event_that_changes_anything_is_guarded_and_only_those_are_open(
    service: TrainingService,
) -> None:
    blocks = create_tab(service, DatasetService(service.home, jobs=service.store))
    events = _event_fns(blocks)
    guarded_names = {_name(f.fn) for f in events if is_guarded(f.fn)}
    open_names = {_name(f.fn) for f in events if not is_guarded(f.fn)}
    assert all(is_guarded(f.fn) != is_read_only(f.fn) for f in events)  # one or the other, never both
    assert guarded_names >= STATE_CHANGING, STATE_CHANGING - guarded_names
    assert open_names == READ_ONLY
    assert (
        not guarded_names & open_names
    )  # e.g. a preset's delete is guarded though a job's ask_delete is open


def test_each_guarded_event_refuses_another_site_before_its_handler_runs(service: TrainingService) -> None:
    blocks = create_tab(service, DatasetService(service.home, jobs=service.store))
    service.home.datasets.mkdir(parents=True, exist_ok=True)
    (service.home.datasets / "cats").mkdir()
    for block_fn in _event_fns(blocks):
        if not is_guarded(block_fn.fn):
            continue
        inputs = ["cats"] * len(block_fn.inputs)
        for headers in (
            {"Origin": "http://evil.example"},
            {"Referer": "http://evil.example/x"},
            {"Origin": "null"},
        ):
            args, _, _ = special_args(block_fn.fn, list(inputs), _request(headers), None)
            with pytest.raises(gr.Error, match="may not change anything here"):
                result = block_fn.fn(*args)
                if hasattr(result, "__next__"):  # the S3 uploads answer as they go
                    next(result)
    assert (service.home.datasets / "cats").is_dir()  # the dataset's Delete, among them, did nothing


def test_the_page_s_own_origin_an_allowed_one_and_no_browser_pass() -> None:
    calls: list[tuple[Any, ...]] = []

    def handler(name: str, text: str | None = None) -> str:
        calls.append((name, text))
        return "done"

    policy = GuardPolicy(
        hosts=None, origins=("http://tools.example:3000",), origin_hosts=frozenset({"proxy.example"})
    )
    fn = guarded(handler, policy, n_inputs=1)
    for headers in ({"Origin": f"http://{PAGE}"}, {"Referer": f"http://{PAGE}/?__theme=dark"},
                    {"Origin": "http://tools.example:3000"}, {"Origin": "https://proxy.example"}, {}):  # fmt: skip
        args, _, _ = special_args(fn, ["x"], _request(headers), None)
        assert fn(*args) == "done", headers
    assert calls == [("x", None)] * 5  # the request goes to the check, never to the handler's `text`
    for headers in ({"Origin": "http://tools.example:3001"}, {"Origin": "http://proxy.example.evil.example"}):
        with pytest.raises(gr.Error):
            fn(*special_args(fn, ["x"], _request(headers), None)[0])
    assert fn("y") == "done" and calls[-1] == ("y", None)  # called from Python (no request): as before


def test_a_handler_with_its_own_request_and_event_data_keeps_them() -> None:
    seen: list[Any] = []

    def handler(request: gr.Request, table: Any, evt: gr.SelectData, shown: str | None = None) -> str:
        seen.append((request, table, evt, shown))
        return "ok"

    fn = guarded(handler, GuardPolicy(hosts=None), n_inputs=1)
    request = _request({"Origin": f"http://{PAGE}"})
    data = gr.SelectData(None, {"index": 1, "value": "v"})
    args, _, event_index = special_args(fn, ["t"], request, data)
    assert fn(*args) == "ok" and event_index == 2
    assert seen[0][:2] == (request, "t") and seen[0][2].index == 1 and seen[0][3] is None
    with pytest.raises(gr.Error):
        fn(*special_args(fn, ["t"], _request({"Origin": "http://evil.example"}), data)[0])


def test_a_request_whose_headers_cannot_be_trusted_is_refused() -> None:
    # gradio 3.41 builds a Request from a dict that its predict route takes from any client's body; no live queue
    # event stands behind such a one here, so it tells nothing about where the request came from.
    forged = gr.Request(headers={"origin": f"http://{PAGE}", "host": PAGE})
    refusal = origin_refusal(forged, GuardPolicy(hosts=None))
    assert refusal is not None and "cannot be told" in refusal
    assert origin_refusal(None, GuardPolicy(hosts=None)) is None


def test_guarding_twice_wraps_once(service: TrainingService) -> None:
    blocks = create_tab(service, DatasetService(service.home, jobs=service.store))
    assert guard_events(blocks, GuardPolicy(hosts=None)) == 0  # create_tab guarded them all already
    with gr.Blocks() as extra:
        box = gr.Textbox()
        box.submit(lambda text: text, [box], [box])
    assert (
        guard_events(extra, GuardPolicy(hosts=None)) == 1
        and guard_events(extra, GuardPolicy(hosts=None)) == 0
    )
