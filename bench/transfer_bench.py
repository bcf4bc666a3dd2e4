"""Upload throughput to a worker over loopback, against a plain HTTP upload of the same file; bytes a repeated job
sends. Prints JSON.

    .venv/bin/python bench/transfer_bench.py [--size-mb 1024] [--chunk-mb 64] [--dir /tmp/bench]

Both servers run as subprocesses on 127.0.0.1 (the worker through the real CLI; the plain one is uvicorn with a
route that streams the body to a file), so the client and the servers do not share a GIL.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kohya_backend.jobs.transfer import (  # noqa: E402
    LocalFile,
    TransferStats,
    Uploader,
    collect_input,
)
from kohya_backend.jobs.worker_client import WorkerClient, WorkerUnreachable  # noqa: E402
from kohya_backend.jobs.worker_protocol import WORKER_PREFIX  # noqa: E402
from kohya_backend.models.hashing import Sha256Cache  # noqa: E402

TOKEN = "transfer-bench-token-0123456789"
PLAIN_APP = """
import os
import sys
from pathlib import Path
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

async def put(request):
    with open(Path(sys.argv[2]) / "upload.bin", "wb") as handle:
        async for chunk in request.stream():
            handle.write(chunk)
        if sys.argv[3] == "fsync":
            handle.flush()
            os.fsync(handle.fileno())
    return PlainTextResponse("ok")

async def health(request):
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/upload", put, methods=["PUT"]), Route("/health", health)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def _random_file(path: Path, size: int) -> None:
    block = os.urandom(16 << 20)
    with open(path, "wb") as handle:
        left = size
        while left > 0:
            handle.write(block[: min(left, len(block))])
            left -= len(block)
            block = hashlib.sha512(block[:64]).digest() + block[64:]  # blocks differ: no dedup anywhere


def _pieces(path: Path, piece: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while block := handle.read(piece):
            yield block


def plain_upload(path: Path, scratch: Path, rounds: int, *, fsync: bool) -> list[float]:
    """Seconds for streaming PUTs of `path` to a bare uvicorn route writing the body to disk (then fsync)."""
    port = _port()
    target = scratch / "plain"
    target.mkdir(exist_ok=True)
    command = [sys.executable, "-c", PLAIN_APP, str(port), str(target), "fsync" if fsync else "-"]
    server = subprocess.Popen(command)
    times = []
    try:
        _wait(f"http://127.0.0.1:{port}/health")
        headers = {"Content-Length": str(path.stat().st_size)}
        with httpx.Client(timeout=600) as client:
            for _ in range(rounds):
                start = time.perf_counter()
                answer = client.put(f"http://127.0.0.1:{port}/upload", content=_pieces(path), headers=headers)
                answer.raise_for_status()
                times.append(time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait()
    return times


def _dataset(folder: Path, files: int, size: int) -> None:
    subset = folder / "10_subject"
    subset.mkdir(parents=True)
    for i in range(files):
        (subset / f"{i:04d}.png").write_bytes(os.urandom(size))
        (subset / f"{i:04d}.txt").write_text(f"subject, picture {i}\n", encoding="utf-8")


def worker_runs(model: Path, scratch: Path, chunk: int, images: int, rounds: int) -> dict[str, object]:
    """Upload the model to a real worker, resume a cut upload, and send a dataset job three times."""
    port = _port()
    token_file = scratch / "token.txt"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    command = [
        sys.executable,
        "-m",
        "kohya_backend",
        "worker",
        "--port",
        str(port),
        "--token-file",
        str(token_file),
    ]
    command += ["--home", str(scratch / "worker"), "--reserve-gb", "0"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    out: dict[str, object] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}{WORKER_PREFIX}/health")
        cache = Sha256Cache(scratch / "hashes.json")
        start = time.perf_counter()
        item = collect_input("pretrained_model_name_or_path", model, cache)
        out["hash_s"] = round(time.perf_counter() - start, 2)
        with WorkerClient(url, TOKEN) as client:
            times = []
            for _ in range(rounds):
                shutil.rmtree(
                    scratch / "worker" / "blobs" / "sha256", ignore_errors=True
                )  # send it all again
                start = time.perf_counter()
                Uploader(client, TransferStats("bench"), chunk_bytes=chunk).ensure([item])
                times.append(time.perf_counter() - start)
            out["worker_upload_s"] = [round(t, 2) for t in times]
            again = TransferStats("bench")
            start = time.perf_counter()
            Uploader(client, again, chunk_bytes=chunk).ensure([item])
            out["repeat_model_bytes_sent"] = again.sent
            out["repeat_model_s"] = round(time.perf_counter() - start, 3)
            out["resume"] = _cut_and_resume(client, scratch, chunk)
            out["dataset_jobs"] = _dataset_jobs(client, model, scratch, cache, chunk, images)
    finally:
        server.terminate()
        server.wait()
    return out


def _cut_and_resume(client: WorkerClient, scratch: Path, chunk: int) -> dict[str, int]:
    path = scratch / "cut.bin"
    _random_file(path, 64 << 20)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    size = path.stat().st_size

    def half() -> Iterator[bytes]:
        sent = 0
        for block in _pieces(path):
            if sent >= size // 2:
                raise ConnectionResetError("cut")
            sent += len(block)
            yield block

    with contextlib.suppress(ConnectionResetError, WorkerUnreachable):
        client.put_blob(sha, 0, size, half(), size)
    time.sleep(1.0)
    _complete, offset = client.blob_offset(sha)
    stats = TransferStats("bench")
    Uploader(client, stats, chunk_bytes=chunk).upload(LocalFile(path, path.name, sha, size), offset)
    return {"size": size, "kept_by_worker": offset, "sent_on_resume": stats.sent}


def _dataset_jobs(
    client: WorkerClient, model: Path, scratch: Path, cache: Sha256Cache, chunk: int, images: int
) -> list[dict[str, int]]:
    dataset = scratch / "dataset"
    _dataset(dataset, images, 200_000)
    runs = []
    for label in ("first", "same again", "one caption changed"):
        if label == "one caption changed":
            caption = next(dataset.rglob("*.txt"))
            caption.write_text("subject, a new caption\n", encoding="utf-8")
        inputs = [
            collect_input("pretrained_model_name_or_path", model, cache),
            collect_input("train_data_dir", dataset, cache),
        ]
        stats = TransferStats("bench")
        Uploader(client, stats, chunk_bytes=chunk).ensure(inputs)
        runs.append(
            {"job": label, "input_bytes": stats.total, "bytes_sent": stats.sent, "files": stats.files}
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the test checkpoint")
    parser.add_argument("--chunk-mb", type=int, default=64, help="upload chunk (one PUT each)")
    parser.add_argument("--images", type=int, default=100, help="images in the test dataset (200 kB each)")
    parser.add_argument("--rounds", type=int, default=3, help="uploads of each kind (the median is reported)")
    parser.add_argument("--dir", help="scratch folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="transfer-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        model = scratch / "model.safetensors"
        _random_file(model, args.size_mb << 20)
        size = model.stat().st_size
        plain = plain_upload(model, scratch, args.rounds, fsync=False)
        synced = plain_upload(model, scratch, args.rounds, fsync=True)
        runs = worker_runs(model, scratch, args.chunk_mb << 20, args.images, args.rounds)
        mib = size / 2**20

        def rate(times: object) -> float:
            return round(mib / statistics.median(times), 1)  # type: ignore[arg-type]

        result = {
            "file_mb": size >> 20,
            "chunk_mb": args.chunk_mb,
            "plain_http_upload_s": [round(t, 2) for t in plain],
            "plain_http_fsync_upload_s": [round(t, 2) for t in synced],
            "plain_http_mb_s": rate(plain),
            "plain_http_fsync_mb_s": rate(synced),
            "worker_upload_mb_s": rate(runs["worker_upload_s"]),
            **runs,
        }
        print(json.dumps(result, indent=2))
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
