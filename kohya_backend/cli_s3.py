"""`python -m kohya_backend s3 ls|upload|download` (thin, for scripts and the README's examples) and the S3 side
of `train --config`: s3:// inputs fetched through the cache before training, an s3:// output_dir uploaded after.

Kept apart from cli.py so each stays small; cli.py adds the parser with add_s3_parser().
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

from kohya_backend.errors import TrainManagementError


class ConsoleProgress:
    """'downloading model 1.2/6.9 GB' on stderr, at most twice a second and once at the end of each file."""

    def __init__(self, verb: str, what: str) -> None:
        self.verb, self.what = verb, what
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        from kohya_backend.jobs.s3_jobs import human_bytes

        now = time.monotonic()
        if done >= total or now - self._last >= 0.5:
            self._last = now
            print(f"{self.verb} {self.what} {human_bytes(done, total)}", file=sys.stderr, flush=True)


class ConsoleEvents:
    """stage_inputs' events for a terminal: 'downloading model 1.2/6.9 GB' lines and its notes, on stderr."""

    def __init__(self) -> None:
        self._bars: dict[str, ConsoleProgress] = {}

    def progress(self, kind: str, *, force: bool = False, **fields: Any) -> None:
        what = str(fields.get("what") or kind)
        bar = self._bars.setdefault(what, ConsoleProgress("downloading", what))
        bar(int(fields.get("done") or 0), int(fields.get("total") or 0))

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def _access() -> Any:
    from kohya_backend.storage.settings import S3Access, default_cache_dir

    return S3Access(default_cache_dir())


def stage_config(source: str) -> tuple[str, Any, Path | None]:
    """For `train --config`: (config text with s3:// inputs replaced by cached local files, the s3:// output_dir
    or None, the local folder the LoRA is written to before its upload, or None)."""
    import tomlkit

    from kohya_backend.config.parse import parse_config
    from kohya_backend.jobs.s3_jobs import S3_INPUT_KEYS, s3_inputs, stage_inputs
    from kohya_backend.storage.uri import is_s3_uri, parse_s3_uri

    values = dict(parse_config(source).values)
    inputs = s3_inputs(values)
    output = (
        parse_s3_uri(values["output_dir"], what="output_dir") if is_s3_uri(values.get("output_dir")) else None
    )
    if not inputs and output is None:
        return source, None, None
    access = _access()
    digest = hashlib.sha256(repr(sorted((k, str(v)) for k, v in values.items())).encode()).hexdigest()[:16]
    stage_dir = access.cache_dir / "staged" / digest
    for key, uri in inputs.items():
        print(f"fetching {S3_INPUT_KEYS[key]} {uri}", file=sys.stderr, flush=True)
    staged = stage_inputs(values, stage_dir, access, events=ConsoleEvents())
    print(f"S3 inputs ready: {staged.fetched} of {staged.total} bytes downloaded", file=sys.stderr)
    local_out = None
    if output is not None:
        local_out = stage_dir / "output"
        staged.values["output_dir"] = local_out.as_posix()
    return tomlkit.dumps(staged.values), output, local_out


def upload_results(local_out: Path, output: Any) -> None:
    """After `train --config`: every LoRA the trainer wrote to `local_out` goes below the s3:// `output`."""
    client = _access().client()
    for path in sorted(local_out.glob("*.safetensors")):
        target = output.child(path.name)
        client.upload_file(path, target, progress=ConsoleProgress("uploading", path.name))
        print(f"uploaded {target}")


def _cmd_ls(args: argparse.Namespace) -> int:
    from kohya_backend.storage.uri import parse_s3_uri

    uri = parse_s3_uri(args.uri)
    client = _access().client()
    count = 0
    for info in client.list_objects(uri):
        print(f"{info.size:>14}  {info.uri}")
        count += 1
    print(f"{count} object(s)", file=sys.stderr)
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    from kohya_backend.models.hashing import Sha256Cache
    from kohya_backend.storage.sync import upload_folder
    from kohya_backend.storage.uri import parse_s3_uri

    source, uri = Path(args.path), parse_s3_uri(args.uri)
    client, hashes = _access().client(), Sha256Cache()
    try:
        if source.is_dir():
            stats = upload_folder(
                client, source, uri, sha256=hashes.sha256, progress=ConsoleProgress("uploading", source.name)
            )
            print(f"{stats.files} file(s), {stats.transferred} of {stats.total} bytes sent to {uri}")
            return 0
        if not source.is_file():
            raise TrainManagementError(f"{source} is not a file or folder", "give a local path to upload")
        target = uri.child(source.name) if args.uri.endswith("/") or not uri.key else uri
        sent = client.upload_file(
            source, target, sha256=hashes.sha256(source), progress=ConsoleProgress("uploading", source.name)
        )
        print(f"{'uploaded' if sent else 'already there (same sha256):'} {target}")
        return 0
    finally:
        hashes.save()


def _cmd_download(args: argparse.Namespace) -> int:
    from kohya_backend.storage.sync import sync_prefix
    from kohya_backend.storage.uri import parse_s3_uri

    uri, dest = parse_s3_uri(args.uri), Path(args.dest)
    access = _access()
    client, cache = access.client(), access.cache()
    if args.uri.endswith("/") or not uri.key:
        stats = sync_prefix(client, cache, uri, dest, progress=ConsoleProgress("downloading", str(uri)))
        print(f"{stats.files} file(s) in {dest}: {stats.transferred} of {stats.total} bytes downloaded")
        return 0
    info = client.head(uri)
    target = dest / uri.name if dest.is_dir() else dest
    cached = cache.fetch(client, info, target, progress=ConsoleProgress("downloading", uri.name))
    print(f"{target} ({cached.fetched} of {info.size} bytes downloaded)")
    return 0


def add_s3_parser(sub: Any) -> None:
    """`s3 ls URI`, `s3 upload PATH URI`, `s3 download URI DEST` (credentials from boto3's standard chain)."""
    s3 = sub.add_parser("s3", help="list, upload and download S3 objects (AWS_ENDPOINT_URL for MinIO & co.)")
    commands = s3.add_subparsers(dest="s3_command", required=True)
    ls = commands.add_parser("ls", help="list every object under s3://bucket/prefix (all pages)")
    ls.add_argument("uri")
    ls.set_defaults(func=_cmd_ls)
    up = commands.add_parser("upload", help="upload a file or a folder (files already there are skipped)")
    up.add_argument("path")
    up.add_argument("uri", help="s3://bucket/key, or a prefix ending in / (a folder always goes below it)")
    up.set_defaults(func=_cmd_upload)
    down = commands.add_parser(
        "download",
        help="download an object, or a prefix ending in / into a folder (through the cache; the folder's other "
        "files stay)",
    )
    down.add_argument("uri")
    down.add_argument("dest")
    down.set_defaults(func=_cmd_download)
