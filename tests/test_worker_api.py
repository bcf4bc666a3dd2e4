"""The worker's HTTP API on a real uvicorn server: token, blobs (cut and resumed uploads, limits), submissions."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from remote_support import TOKEN, WorkerThread
from server_support import stranger

from kohya_backend.jobs.pool import ask_worker
from kohya_backend.jobs.store import InvalidJobId
from kohya_backend.jobs.transfer import (
    LocalFile,
    LocalInput,
    TransferStats,
    Uploader,
    collect_input,
)
from kohya_backend.jobs.worker_client import (
    WorkerAnswerInvalid,
    WorkerAuthError,
    WorkerClient,
    WorkerRejected,
    WorkerUnreachable,
)
from kohya_backend.jobs.worker_protocol import WORKER_PREFIX, InvalidName
from kohya_backend.models.hashing import BackgroundSha256, Sha256Cache
from kohya_backend.service.login_limit import BASE_WAIT_S, FREE_FAILURES
from kohya_backend.service.worker import build_worker

SHA0 = "0" * 64
JOB0 = "20200101-000000-abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerThread]:
    worker = build_worker(tmp_path_factory.mktemp("worker"), max_blob_bytes=16 << 20, reserve_bytes=0)
    with WorkerThread(worker) as running:
        yield running


@pytest.fixture
def client(server: WorkerThread) -> Iterator[WorkerClient]:
    with WorkerClient(server.url, TOKEN) as running:
        yield running


def _inputs(demo_assets: Path, cache: Sha256Cache) -> list:
    return [
        collect_input(
            "pretrained_model_name_or_path", demo_assets / "models" / "demo-sd_1_5.safetensors", cache
        ),
        collect_input("train_data_dir", demo_assets / "datasets" / "demo", cache),
        collect_input("tokenizer_cache_dir", demo_assets / "models" / "tokenizer", cache),
    ]


def _spec(items: list, key: str = "client-a:job-1", **changes: object) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "client_key": key,
        "fm_type": "sd_1_5",
        "output_name": "remote-api",
        "config_params": {
            "resolution": "64,64",
            "max_train_steps": 2,
            "network_dim": 4,
            "mixed_precision": "no",
        },
        "inputs": {item.key: item.spec() for item in items},
    }
    spec.update(changes)
    return spec


def test_health_is_open_and_everything_else_needs_the_token(tmp_path: Path) -> None:
    worker = build_worker(tmp_path / "worker", reserve_bytes=0)
    with WorkerThread(worker) as server:
        base = server.url + WORKER_PREFIX
        assert httpx.get(f"{base}/health").json()["ok"] is True
        routes = [
            ("GET", "/info"), ("HEAD", f"/blobs/{SHA0}"), ("PUT", f"/blobs/{SHA0}?offset=0&size=1"),
            ("POST", "/blobs/query"), ("DELETE", f"/blobs/{SHA0}"), ("POST", "/jobs"), ("GET", f"/jobs/{JOB0}"), ("GET", f"/jobs/{JOB0}/events"),
            ("GET", f"/jobs/{JOB0}/log"), ("GET", f"/jobs/{JOB0}/files/output/x.png"),
            ("POST", f"/jobs/{JOB0}/cancel"), ("POST", f"/jobs/{JOB0}/resume"), ("DELETE", f"/jobs/{JOB0}"),
        ]  # fmt: skip
        for n, (method, path) in enumerate(routes):
            with stranger(
                f"127.0.0.{10 + n}"
            ) as other:  # a client per route: three refusals each, no back-off
                for headers in (
                    {},
                    {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": TOKEN},
                ):
                    answer = other.request(method, base + path, headers=headers, content=b"x")
                    assert answer.status_code == 401, (method, path, headers)
        info = httpx.get(f"{base}/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert info["slots"] == 1 and info["gpus"] == [] and info["free_disk_bytes"] > 0
        assert "token" not in str(info).lower()


def test_a_client_guessing_the_token_backs_off_and_no_other_client_waits(tmp_path: Path) -> None:
    worker = build_worker(tmp_path / "worker", reserve_bytes=0)
    good = {"Authorization": f"Bearer {TOKEN}"}
    with WorkerThread(worker) as server, stranger() as guesser:
        info = server.url + WORKER_PREFIX + "/info"
        for n in range(FREE_FAILURES + 1):
            assert guesser.get(info, headers={"Authorization": f"Bearer guess-{n}"}).status_code == 401
        refused = guesser.get(info, headers={"Authorization": "Bearer guess-x"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= BASE_WAIT_S
        assert refused.json()["detail"]["error"] == "TooManyFailures"
        assert (
            guesser.get(info, headers=good).status_code == 429
        )  # even the right token waits: a guess gains nothing
        assert httpx.get(info, headers=good).status_code == 200  # another client is not held up
        # This host's own client, with a token the worker no longer takes: refused, then told to wait, and shown as
        # "unauthorized" (not "offline") either way.
        with WorkerClient(server.url, "an-old-token-0123456789") as old:
            for _ in range(FREE_FAILURES + 1):
                with pytest.raises(WorkerAuthError) as refused_token:
                    old.info()
                assert refused_token.value.message.endswith("refused the token")
            with pytest.raises(WorkerAuthError) as waiting:
                old.info()
            assert "too often" in waiting.value.message and "token file" in (waiting.value.hint or "")
            assert ask_worker("w", old).state == "unauthorized"


def test_an_upload_cut_mid_way_resumes_from_the_workers_offset(client: WorkerClient, tmp_path: Path) -> None:
    data = os.urandom(12 << 20)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()

    def cut_cable() -> Iterator[bytes]:
        for start in range(0, 5 << 20, 1 << 20):
            yield data[start : start + (1 << 20)]
        raise ConnectionResetError("cable pulled")

    with pytest.raises((ConnectionResetError, WorkerUnreachable)):
        client.put_blob(sha, 0, len(data), cut_cable(), len(data))
    offsets = [client.blob_offset(sha)]
    while len(offsets) < 3 or offsets[-1] != offsets[-3]:  # until the worker settled the dropped request
        time.sleep(0.2)
        offsets.append(client.blob_offset(sha))
    complete, offset = offsets[-1]
    assert not complete and 0 < offset <= 5 << 20

    item = LocalInput(
        "pretrained_model_name_or_path", path.name, (LocalFile(path, path.name, sha, len(data)),)
    )
    stats = TransferStats("test")
    Uploader(client, stats, chunk_bytes=4 << 20).ensure([item])  # asks the worker where to go on
    assert stats.sent == len(data) - offset and stats.skipped == 0  # only the rest went over the wire
    assert client.blob_offset(sha) == (True, len(data))
    again = TransferStats("again")
    Uploader(client, again).ensure([item])
    assert again.sent == 0 and again.skipped == len(data)


def test_oversize_and_overlong_uploads_are_refused(client: WorkerClient, server: WorkerThread) -> None:
    big = 17 << 20
    with pytest.raises(WorkerRejected) as info:
        client.put_blob("a" * 64, 0, big, iter([b"x" * 1024]), 1024)
    assert info.value.status == 413 and "limit" in info.value.message
    assert client.blob_offset("a" * 64) == (False, 0)
    with pytest.raises(WorkerRejected) as info:
        client.put_blob("b" * 64, 0, 10, iter([b"y" * 20]), 20)
    assert info.value.status == 413
    assert server.worker.blobs.path("b" * 64) is None


def test_traversal_in_names_paths_and_ids_is_refused(
    client: WorkerClient, demo_assets: Path, server: WorkerThread
) -> None:
    inputs = _inputs(demo_assets, Sha256Cache(demo_assets / "hashes.json"))
    Uploader(client, TransferStats("w")).ensure(inputs)
    good = _spec(inputs)
    bad_specs = []
    for path in ("../../../etc/cron.d/x", "/etc/passwd", "10_demo/../../x.png", ".ssh/authorized_keys"):
        spec = _spec(inputs)
        spec["inputs"]["train_data_dir"]["files"][0]["path"] = path
        bad_specs.append(spec)
    model = _spec(inputs)
    model["inputs"]["pretrained_model_name_or_path"]["name"] = "../escape.safetensors"
    bad_specs.append(model)
    bad_specs.append(_spec(inputs, key="../../x"))
    bad_specs.append(_spec(inputs, config_params={"output_dir": "/tmp"}))
    # a dataset_config names image folders anywhere: never from a client
    bad_specs.append(_spec(inputs, config_params={"dataset_config": "/etc/datasets.toml"}))
    bad_specs.append(_spec(inputs, inputs={**good["inputs"], "resume": good["inputs"]["train_data_dir"]}))
    for spec in bad_specs:
        with pytest.raises(WorkerRejected) as info:
            client.submit(spec)
        assert info.value.status == 400, spec
    base = server.url + WORKER_PREFIX
    headers = {"Authorization": f"Bearer {TOKEN}"}
    refused = [  # each reaches its handler (one path segment), whose validator must answer 400
        ("GET", "/jobs/not-an-id"), ("GET", f"/jobs/{JOB0}x"), ("GET", f"/jobs/{JOB0}x/log"),
        ("GET", f"/jobs/{JOB0}x/events"), ("POST", f"/jobs/{JOB0}x/cancel"), ("DELETE", f"/jobs/{JOB0}x"),
        ("GET", f"/jobs/{JOB0}/files/output%2F..%2F..%2Fjobs.sqlite3"), ("GET", f"/jobs/{JOB0}/files/config.toml"),
        ("HEAD", f"/blobs/{'a' * 63}."), ("HEAD", f"/blobs/{SHA0[:-1]}G"), ("DELETE", f"/blobs/{'a' * 63}."),
        ("PUT", f"/blobs/{'a' * 63}.?offset=0&size=1"),
    ]  # fmt: skip
    for method, path in refused:
        assert httpx.request(method, base + path, headers=headers).status_code == 400, (method, path)
    assert server.worker.service.store.list()[1] == 0


def test_submit_links_inputs_from_blobs_once_and_is_idempotent(
    client: WorkerClient, demo_assets: Path, server: WorkerThread
) -> None:
    cache = Sha256Cache(demo_assets / "hashes.json")
    inputs = _inputs(demo_assets, cache)
    missing = _spec(inputs, key="client-a:missing")
    missing["inputs"]["train_data_dir"]["files"][0]["sha256"] = "c" * 64
    with pytest.raises(WorkerRejected) as info:
        client.submit(missing)
    assert info.value.status == 409 and info.value.detail["missing"] == ["c" * 64]

    stats = TransferStats("w")
    Uploader(client, stats).ensure(inputs)
    first = client.submit(_spec(inputs))
    again = client.submit(_spec(inputs))
    assert first["id"] == again["id"] and first["status"] == "queued"
    other = client.submit(_spec(inputs, key="client-b:job-1"))  # same output name, another client: fine
    assert other["id"] != first["id"]

    job = server.worker.service.store.get(first["id"])
    model = server.worker.service.home.models / job.model
    blob = server.worker.blobs.path(inputs[0].files[0].sha256)
    assert blob is not None and model.stat().st_ino == blob.stat().st_ino  # a hard link, not a copy
    assert BackgroundSha256(model)._thread is None  # the trainer there finds its hash: no 2-7 GB re-read
    assert Sha256Cache().get(model) == inputs[0].files[0].sha256
    cache.save()  # what the remote session does after hashing a job's inputs
    assert Sha256Cache(demo_assets / "hashes.json").get(inputs[1].files[0].path) == inputs[1].files[0].sha256
    dataset = server.worker.service.home.datasets / job.dataset
    assert sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file()) == sorted(
        f.rel for f in inputs[1].files
    )
    assert (
        'tokenizer_cache_dir = "' in job.config_toml
        and str(server.worker.service.home.models) in job.config_toml
    )
    view = client.job(first["id"])
    assert (
        view is not None and view["output"] is None and str(server.worker.service.home.root) not in str(view)
    )
    assert client.job(JOB0) is None


def test_a_job_asks_the_worker_for_several_gpus(
    client: WorkerClient, demo_assets: Path, server: WorkerThread
) -> None:
    """The spec's gpus (GPUs per job) reaches the worker's own scheduler, which gives the job that many of its GPUs
    (on this CPU-only worker: that many CPU processes); a bad count is refused with the reason."""
    inputs = _inputs(demo_assets, Sha256Cache(demo_assets / "hashes.json"))
    Uploader(client, TransferStats("w")).ensure(inputs)
    with pytest.raises(WorkerRejected) as info:
        client.submit(_spec(inputs, key="client-g:zero", output_name="gpus-zero", gpus=0))
    assert info.value.status == 400 and "GPUs per job must be a whole number from 1" in str(info.value)
    view = client.submit(_spec(inputs, key="client-g:two", output_name="gpus-two", gpus=2))
    assert server.worker.service.store.get(view["id"]).params["gpus"] == 2


def test_sending_a_blob_the_worker_already_has_is_answered_without_reading_the_body(
    client: WorkerClient, server: WorkerThread
) -> None:
    data = b"already there" * 100
    sha = hashlib.sha256(data).hexdigest()
    client.put_blob(sha, 0, len(data), iter([data]), len(data))
    huge = 50 << 30  # a client (or a replayed request) announcing far more than it will ever send
    request = (
        f"PUT {WORKER_PREFIX}/blobs/{sha}?offset=0&size={len(data)} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {huge}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request.encode() + b"x" * 4096)
        received = b""
        while block := sock.recv(65536):  # times out if the worker waits for the body; ends when it closes
            received += block
        answer = received.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 200"), answer
    assert '"complete": true' in answer and f"Upload-Offset: {len(data)}".lower() in answer.lower()
    assert server.worker.blobs.path(sha) is not None


def test_ids_are_checked_before_urls_and_downloads_stop_at_their_cap(
    client: WorkerClient, demo_assets: Path, server: WorkerThread, tmp_path: Path
) -> None:
    with pytest.raises(InvalidJobId):
        client.job("../../jobs.sqlite3")
    with pytest.raises(InvalidJobId):
        client.events("20200101-000000-abcdef/../x", 0, 0)
    inputs = _inputs(demo_assets, Sha256Cache(demo_assets / "hashes.json"))
    Uploader(client, TransferStats("w")).ensure(inputs)
    view = client.submit(_spec(inputs, key="client-a:download"))
    folder = server.worker.service.store.get(view["id"]).folder
    (folder / "output").mkdir(exist_ok=True)
    (folder / "output" / "big.png").write_bytes(os.urandom(300_000))
    target = tmp_path / "got" / "big.png"
    with pytest.raises(WorkerAnswerInvalid, match="larger"):
        client.download(view["id"], "output/big.png", target, max_bytes=299_999)
    assert not target.parent.exists() or list(target.parent.iterdir()) == []  # no partial kept
    with pytest.raises(InvalidName):
        client.download(view["id"], "../config.toml", target)
    sha, size = client.download(view["id"], "output/big.png", target, max_bytes=300_000)
    assert size == 300_000 and hashlib.sha256(target.read_bytes()).hexdigest() == sha
    (folder / "output" / "link.png").symlink_to(folder / "config.toml")  # inside output/, pointing out of it
    with pytest.raises(WorkerRejected) as outside:
        client.download(view["id"], "output/link.png", tmp_path / "link.png")
    assert outside.value.status == 404 and str(folder) not in outside.value.message


def test_event_long_polls_hold_no_thread_and_answer_new_lines_with_relative_paths(
    client: WorkerClient, demo_assets: Path, server: WorkerThread
) -> None:
    inputs = _inputs(demo_assets, Sha256Cache(demo_assets / "hashes.json"))
    Uploader(client, TransferStats("w")).ensure(inputs)
    job_id = client.submit(_spec(inputs, key="client-a:events"))["id"]
    folder = server.worker.service.store.get(job_id).folder
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{server.url}{WORKER_PREFIX}/jobs/{job_id}/events"
    polls = 48  # more than the thread pool's 40 threads
    with ThreadPoolExecutor(polls) as pool:
        waiting = [
            pool.submit(httpx.get, url, params={"wait": 20}, headers=headers, timeout=30)
            for _ in range(polls)
        ]
        time.sleep(1.0)
        started = time.monotonic()
        assert httpx.get(f"{server.url}{WORKER_PREFIX}/info", headers=headers, timeout=30).status_code == 200
        assert time.monotonic() - started < 10  # not queued behind the 20 s polls
        assert not any(poll.done() for poll in waiting)
        lines = [
            {"kind": "saved", "path": f"{folder}/output/x.safetensors"},
            {"kind": "sample", "path": "/etc/x"},
        ]
        with open(folder / "events.jsonl", "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(line) + "\n" for line in lines))
        answers = [poll.result().json() for poll in waiting]
    expected = [{"kind": "saved", "path": "output/x.safetensors"}, {"kind": "sample", "path": None}]
    for answer in answers:
        assert answer == {"events": expected, "next": 2, "status": "queued", "settled": False}
    assert client.events(job_id, 2, 0)["events"] == []
    client.cancel(job_id)
    started = time.monotonic()
    assert client.events(job_id, 2, 20) == {"events": [], "next": 2, "status": "cancelled", "settled": True}
    assert time.monotonic() - started < 10  # a settled job is not waited for (20 s)


class NoHeadClient(WorkerClient):
    """The real client, except that asking for a blob's offset with HEAD fails the test."""

    def blob_offset(self, sha256: str) -> tuple[bool, int]:
        raise AssertionError("the uploader asked with HEAD after a 409")


def test_a_409_names_the_offset_and_the_uploader_goes_on_from_it(
    client: WorkerClient, server: WorkerThread, tmp_path: Path
) -> None:
    data = os.urandom(3 << 20)
    sha = hashlib.sha256(data).hexdigest()
    client.put_blob(sha, 0, len(data), iter([data[: 1 << 20]]), 1 << 20)
    with pytest.raises(WorkerRejected) as conflict:
        client.put_blob(sha, 12345, len(data), iter([data[12345:20000]]), 20000 - 12345)
    assert conflict.value.status == 409 and conflict.value.detail["offset"] == 1 << 20
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    stats = TransferStats("w")
    with NoHeadClient(server.url, TOKEN) as uploader_client:
        Uploader(uploader_client, stats).upload(LocalFile(path, path.name, sha, len(data)), 12345)
    assert client.blob_offset(sha) == (True, len(data))
    refused, rest = len(data) - 12345, len(data) - (1 << 20)
    assert stats.sent == refused + rest  # the chunk the 409 refused, then only what the worker lacked
