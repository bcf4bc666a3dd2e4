"""No 500 for bad text: every string field of every route of the REST API (JSON fields and keys, path and query
parameters, form fields, file names and contents, headers), fuzzed with hypothesis over real HTTP, gets an answer
below 500; a lone surrogate in a JSON field gets 400 naming the field. On both pydantic lines."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from home_support import stub_dataset, stub_sd15
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import running

from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service, create_app

LONE = "\ud800"
EXAMPLES = int(os.environ.get("TM_FUZZ_EXAMPLES", "40"))  # raise it to fuzz longer
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Any text, lone surrogates included (hypothesis leaves them out unless asked).
TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=12)
RAW = st.binary(max_size=12)
# What a client can put in a header value: bytes outside the control characters (h11 refuses those).
HEADER = st.binary(max_size=12).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F).strip())


def _json(body: Any) -> bytes:
    """JSON as a client that does not check its strings sends it: lone surrogates as \\ud800 escapes."""
    return json.dumps(body).encode("ascii")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    service = build_service(tmp_path_factory.mktemp("home"))
    stub_sd15(service.home.models / "sd15.safetensors")
    stub_dataset(service.home.datasets / "cats" / "5_cat")
    with running(create_app(service)) as base, httpx.Client(base_url=base + API_PREFIX, timeout=60) as client:
        yield client


def _send(api: httpx.Client, method: str, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    if body is not None:
        kwargs.update(
            content=_json(body), headers={"Content-Type": "application/json", **kwargs.get("headers", {})}
        )
    return api.request(method, path, **kwargs)


def _training(**fields: Any) -> dict[str, Any]:
    params = {
        "training_instance_type": "local",
        "model": "sd15.safetensors",
        "dataset": "cats",
        "fm_type": "sd_1_5",
    }
    config = {"resolution": "64,64", "max_train_steps": 2, "mixed_precision": "no"}
    for name, value in fields.items():
        (params if name in params else config)[name] = value
    return {"training_params": params, "config_params": config}


CONFIG_FIELDS = ["output_name", "sample_prompts", "caption_extension", "optimizer_type", "tokenizer_cache_dir",
                 "network_weights", "reg_data_dir", "lr_scheduler"]  # fmt: skip
# (method, path, body builder, the field a bad string lands in)
JSON_ROUTES: list[tuple[str, str, Any, str]] = [
    *[("POST", "/trainings", lambda v, f=f: _training(**{f: v}), f"training_params.{f}")
      for f in ("training_instance_type", "model", "dataset", "fm_type")],
    *[("POST", "/trainings", lambda v, f=f: _training(**{f: v}), f"config_params.{f}") for f in CONFIG_FIELDS],
    ("POST", "/trainings", lambda v: {**_training(), "config_params": f"output_name = '{v}'"}, "config_params"),
    ("POST", "/trainings", lambda v: {**_training(), "config_params": {v: 1}}, "a key in config_params"),
    ("POST", "/config/format", lambda v: {"fm_type": v, "config_params": ""}, "fm_type"),
    ("POST", "/config/format", lambda v: {"fm_type": "sd_1_5", "config_params": v}, "config_params"),
    ("POST", "/config/format", lambda v: {"fm_type": "sd_1_5", "config_params": {"output_name": v}},
     "config_params.output_name"),
    ("POST", "/config/format", lambda v: {"fm_type": "sd_1_5", "config_params": "", "model": v}, "model"),
    ("POST", "/config/format", lambda v: {"fm_type": "sd_1_5", "config_params": "", "dataset": v}, "dataset"),
    ("POST", "/config/format", lambda v: {"fm_type": "sd_1_5", "config_params": "", "training_instance_type": v},
     "training_instance_type"),
    ("PUT", "/datasets/cats/captions/5_cat/0.png", lambda v: {"caption": v}, "caption"),
    ("POST", "/s3/uploads", lambda v: {"kind": v, "name": "cats"}, "kind"),
    ("POST", "/s3/uploads", lambda v: {"kind": "dataset", "name": v}, "name"),
    ("POST", "/workers", lambda v: {"url": v, "token": "t" * 20}, "url"),
    ("POST", "/workers", lambda v: {"url": "http://127.0.0.1:9", "token": v}, "token"),
    ("POST", "/workers", lambda v: {"url": "http://127.0.0.1:9", "token": "t" * 20, "name": v}, "name"),
]  # fmt: skip
IDS = [f"{method} {path} {field}" for method, path, _, field in JSON_ROUTES]


@pytest.mark.parametrize(("method", "path", "build", "field"), JSON_ROUTES, ids=IDS)
def test_a_lone_surrogate_in_any_json_field_is_a_400_naming_it(
    api: httpx.Client, method: str, path: str, build: Any, field: str
) -> None:
    answer = _send(api, method, path, build(f"a{LONE}b"))
    assert answer.status_code == 400, answer.text
    detail = answer.json()["detail"]
    assert detail["error"] == "InvalidText" and detail["field"] == field and field in detail["message"]


@pytest.mark.parametrize(("method", "path", "build", "field"), JSON_ROUTES, ids=IDS)
def test_any_text_in_any_json_field_never_makes_a_500(
    api: httpx.Client, method: str, path: str, build: Any, field: str
) -> None:
    @settings(FUZZ, max_examples=max(1, EXAMPLES // 2))  # one field at a time: fewer each, many fields
    @given(value=TEXT)
    def check(value: str) -> None:
        answer = _send(api, method, path, build(value))
        assert answer.status_code < 500, (value, answer.text)

    check()


# Values the fuzzer's short texts never reach: one name longer than any file system holds, a path longer than any
# holds, and JSON nested deeper than Python's reader goes (each a 500 from the file system or json once).
LONG_VALUES = ["a" * 300, "a/" * 2100, "é" * 200]
DEEP = 5000


@pytest.mark.parametrize(("method", "path", "build", "field"), JSON_ROUTES, ids=IDS)
def test_overlong_text_in_any_json_field_never_makes_a_500(
    api: httpx.Client, method: str, path: str, build: Any, field: str
) -> None:
    for value in LONG_VALUES:
        answer = _send(api, method, path, build(value))
        assert answer.status_code < 500, (value[:10], answer.text)


@pytest.mark.parametrize(("method", "path"), sorted({(m, p) for m, p, _, _ in JSON_ROUTES}))
def test_json_nested_too_deeply_is_a_400(api: httpx.Client, method: str, path: str) -> None:
    for body in (b"[" * DEEP + b"]" * DEEP, b'{"name": ' + b"[" * DEEP + b"]" * DEEP + b"}"):
        answer = api.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, answer.text
        assert answer.json()["detail"]["error"] == "InvalidBody"


@FUZZ
@given(part=RAW, query=TEXT)
def test_any_bytes_in_paths_and_queries_never_make_a_500(api: httpx.Client, part: bytes, query: str) -> None:
    name = quote(part, safe="")
    for method, path in [
        ("GET", f"/datasets/{name}"),
        ("GET", f"/datasets/{name}/report"),
        ("GET", f"/datasets/cats/images/5_cat/{name}"),
        ("GET", f"/datasets/cats/captions/{name}"),
        ("DELETE", f"/datasets/x{name}"),
        ("DELETE", f"/datasets/cats/images/x{name}"),
        ("GET", f"/trainings/{name}"),
        ("GET", f"/trainings/{name}/logs"),
        ("POST", f"/trainings/{name}/cancel"),
        ("DELETE", f"/workers/x{name}"),
        ("GET", f"/s3/uploads/{name}"),
    ]:
        answer = _send(api, method, path)
        assert answer.status_code < 500, (method, path, answer.text)
    encoded = query.encode("utf-8", "surrogatepass")
    for path in ("/trainings?status=", "/datasets?caption_extension=", "/datasets/cats?caption_extension="):
        answer = _send(api, "GET", path + quote(encoded, safe=""))
        assert answer.status_code < 500, (path, answer.text)


@FUZZ
@given(name=TEXT, subject=TEXT, repeats=TEXT, preprocess=TEXT, filename=TEXT, caption=RAW)
def test_any_text_in_a_dataset_upload_never_makes_a_500(
    api: httpx.Client, name: str, subject: str, repeats: str, preprocess: str, filename: str, caption: bytes
) -> None:
    def raw(text: str) -> bytes:
        return text.encode("utf-8", "surrogatepass")  # invalid UTF-8 where the text has a lone surrogate

    boundary = "fuzz-boundary-0123"
    parts = [(b"name", raw("zz" + name)), (b"subject", raw(subject)), (b"repeats", raw(repeats or "1")),
             (b"preprocess", raw(preprocess))]  # fmt: skip
    body = b""
    for key, value in parts:
        body += f"--{boundary}\r\n".encode() + b'Content-Disposition: form-data; name="' + key + b'"\r\n\r\n'
        body += value + b"\r\n"
    image = Path(__file__)  # not an image: it is left out with a reason, never a 500
    for file_name, content in (
        (raw(filename) + b".png", image.read_bytes()[:64]),
        (raw(filename) + b".txt", caption),
    ):
        body += f"--{boundary}\r\n".encode()
        body += (
            b'Content-Disposition: form-data; name="files"; filename="'
            + file_name.replace(b'"', b"")
            + b'"\r\n'
        )
        body += b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    answer = api.post(
        "/datasets", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert answer.status_code < 500, answer.text


@FUZZ
@given(key=HEADER)
def test_any_idempotency_key_never_makes_a_500(api: httpx.Client, key: bytes) -> None:
    answer = api.post(
        "/trainings",
        content=_json(_training(max_train_steps=1)),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    assert answer.status_code < 500, answer.text
