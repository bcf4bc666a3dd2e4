"""`python -m kohya_backend worker` (serve a remote GPU worker), `worker gc` (free its disk) and
`workers add|list|remove` (the registry).

Kept apart from cli.py so each stays small; cli.py adds these parsers with add_worker_parsers().
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.worker_protocol import (
    DEFAULT_GC_OLDER_THAN_DAYS,
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_RESERVE_BYTES,
    DEFAULT_WORKER_HOME,
    DEFAULT_WORKER_PORT,
)
from kohya_backend.service.home import DEFAULT_HOME

_GIB = 2**30


def _cmd_worker(args: argparse.Namespace) -> int:
    from kohya_backend.service.worker import TOKEN_ENV, check_token, read_token_file, serve_worker

    if args.token_file:
        token = read_token_file(Path(args.token_file), create=args.create_token)
    elif os.environ.get(TOKEN_ENV):
        token = check_token(os.environ[TOKEN_ENV].strip(), TOKEN_ENV)  # before the home is made
    else:
        raise TrainManagementError(
            "a worker needs a token: every request but /health must carry it",
            "pass --token-file token.txt (add --create-token to have one generated), or set " + TOKEN_ENV,
        )
    serve_worker(
        Path(args.home),
        token=token,
        host=args.host,
        port=args.port,
        max_blob_bytes=int(args.max_blob_gb * _GIB),
        reserve_bytes=int(args.reserve_gb * _GIB),
        forwarded_allow_ips=args.forwarded_allow_ips,
    )
    return 0


def _cmd_worker_gc(args: argparse.Namespace) -> int:
    from kohya_backend.service.worker_gc import collect_garbage

    if args.older_than_days < 0:
        raise TrainManagementError("--older-than-days must be 0 or more", "e.g. --older-than-days 7")
    report = collect_garbage(Path(args.home), older_than_s=args.older_than_days * 86400)
    print(report.summary())
    if report.kept_recent:
        print("recently used items are kept; pass --older-than-days 0 to remove them too", file=sys.stderr)
    return 0


def _token(args: argparse.Namespace) -> str:
    from kohya_backend.jobs.worker_protocol import read_token

    if args.token_file:
        return read_token(Path(args.token_file))
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    return getpass.getpass("worker token (from its token file): ").strip()


def _cmd_workers(args: argparse.Namespace) -> int:
    from kohya_backend.jobs.pool import check_worker
    from kohya_backend.jobs.registry import WorkerRegistry

    registry = WorkerRegistry(Path(args.home))
    if args.workers_command == "add":
        before = {e.name: e.url for e in registry.entries()}
        entry = registry.add(args.url, _token(args), name=args.name)
        state = check_worker(entry)
        what = "added" if entry.name not in before else "updated the token of"
        if entry.name in before and before[entry.name] != entry.url:
            what = f"moved (from {before[entry.name]})"
        print(f"{what} {entry.name} ({entry.url}): {state.state}, {state.gpu_label()}")
        if state.error:
            print(f"  {state.error}", file=sys.stderr)
        if entry.public()["warning"]:
            print(f"warning: {entry.public()['warning']}", file=sys.stderr)
        print(f"instance type: worker:{entry.name}", file=sys.stderr)
        return 0
    if args.workers_command == "remove":
        from kohya_backend.jobs.remote import remove_worker
        from kohya_backend.jobs.store import JobStore

        remove_worker(registry, JobStore(Path(args.home)), args.name)
        print(f"removed {args.name}")
        return 0
    rows: list[dict[str, Any]] = []
    for entry in registry.entries():
        rows.append(
            {**entry.public(), **check_worker(entry).public(), "instance_type": f"worker:{entry.name}"}
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        disk = f"{row['free_disk_gb']:.0f} GiB free" if row.get("free_disk_gb") else "disk ?"
        print(f"{row['name']:<20} {row['state']:<12} {row['gpu']:<32} {disk:<14} {row['url']}")
        if row["warning"]:
            print(f"warning: {row['name']}: {row['warning']}", file=sys.stderr)
    print(f"{len(rows)} worker(s)", file=sys.stderr)
    return 0


def add_worker_parsers(sub: Any) -> None:
    """The `worker` and `workers` commands."""
    worker = sub.add_parser("worker", help="serve this machine as a remote GPU worker (token required)")
    worker.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    worker.add_argument("--port", type=int, default=DEFAULT_WORKER_PORT)
    worker.add_argument("--token-file", help="file holding the token clients must send")
    worker.add_argument(
        "--create-token", action="store_true", help="write a new random token if the file is missing"
    )
    worker.add_argument("--home", default=DEFAULT_WORKER_HOME, help="the worker's home folder")
    worker.add_argument(
        "--forwarded-allow-ips",
        metavar="IPS",
        help="TLS reverse proxies (comma-separated addresses) whose X-Forwarded-For names the client; default "
        "none: every client is the address it connects from",
    )
    max_gb, reserve_gb = DEFAULT_MAX_BLOB_BYTES / _GIB, DEFAULT_RESERVE_BYTES / _GIB
    worker.add_argument(
        "--max-blob-gb",
        type=float,
        default=max_gb,
        help=f"largest file a client may upload (default {max_gb:g})",
    )
    worker.add_argument(
        "--reserve-gb",
        type=float,
        default=reserve_gb,
        help=f"disk space uploads leave free (default {reserve_gb:g})",
    )
    worker.set_defaults(func=_cmd_worker)
    worker_commands = worker.add_subparsers(dest="worker_command")
    gc = worker_commands.add_parser(
        "gc",
        help="free disk: blobs and inputs no job that may still train uses, stale partial uploads",
        description="Removes blobs, materialised inputs and partial uploads that no queued, running or resumable "
        "job uses and nobody used for --older-than-days (never anything touched in the last 10 minutes). Safe "
        "while the worker runs.",
    )
    gc.add_argument("--home", default=argparse.SUPPRESS, help="the worker's home folder")
    gc.add_argument(
        "--older-than-days",
        type=float,
        default=DEFAULT_GC_OLDER_THAN_DAYS,
        help=f"keep what was used more recently (default {DEFAULT_GC_OLDER_THAN_DAYS:g})",
    )
    gc.set_defaults(func=_cmd_worker_gc)

    workers = sub.add_parser("workers", help="register the remote workers jobs may train on")
    commands = workers.add_subparsers(dest="workers_command", required=True)
    add = commands.add_parser("add", help="add (or update) a worker by URL and token")
    add.add_argument("url", help="the URL the worker printed, e.g. http://gpu-box:7870")
    add.add_argument("--token-file", help="the worker's token file (default: read the token from stdin)")
    add.add_argument("--name", help="a name for it (default: from the URL's host and port)")
    listing = commands.add_parser("list", help="list workers with their GPU and state (tokens never shown)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    remove = commands.add_parser("remove", help="forget a worker")
    remove.add_argument("name")
    for parser in (add, listing, remove):
        parser.add_argument("--home", default=DEFAULT_HOME, help="the Train Management home folder")
        parser.set_defaults(func=_cmd_workers)
