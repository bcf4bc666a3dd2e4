"""A small S3 client over boto3: head, paged listing, ranged reads, resumable parallel downloads, deduplicated
uploads, and errors that name the bucket/key and the store's error code.

Credentials, region and endpoint come from boto3's standard chain (AWS_PROFILE, the environment, ~/.aws, an
instance role; AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for MinIO, R2, Wasabi or a test server): nothing secret
passes through this project. Requests are retried by botocore's `standard` retry mode.

Downloads land in `<dest>.part` (with `<dest>.part.json` naming the object's ETag and size): a download that was
cut continues from the bytes already there with ranged GETs (`Range: bytes=N-`), pinned to the same ETag so a
replaced object starts over. Every ranged answer's Content-Range is checked: a store that ignores Range (200 with the
whole object) is read from byte 0 again, one that answers other bytes is refused, and answers without a byte end
the download after a few tries instead of looping. Large objects are fetched in parallel parts (TransferConfig's part size and
concurrency), written in order, so the `.part` file always holds a prefix of the object. Every download is
verified (size; sha256 when the object's metadata carries one; MD5 when the ETag is a single-part MD5).
Uploads go through boto3's TransferConfig (parallel multipart) and record the file's sha256 in the object's
metadata, so uploading a file the object already holds (same sha256 and size) sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kohya_backend.errors import StorageError
from kohya_backend.storage.uri import S3Uri

SHA256_META = "sha256"  # x-amz-meta-sha256
PART_BYTES = 8 << 20
CONCURRENCY = 8
MULTIPART_THRESHOLD = 32 << 20
MAX_ATTEMPTS = 5  # botocore's standard mode, per request
STREAM_RETRIES = 5  # a body cut mid-way is continued from where it stopped this many times per call
_READ_BLOCK = 1 << 20
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_CODE_IN_TEXT = re.compile(r"\(([A-Za-z0-9.]+)\)")

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_DENIED = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
}


class DownloadCancelled(StorageError):
    """The caller's `cancelled()` said stop; what arrived stays in the .part file for the next attempt."""


def _range_start(answer: dict[str, Any]) -> int | None:
    """The first byte a ranged GET's answer holds (its Content-Range), or None when the store ignored the Range and
    sent the whole object (200, no Content-Range)."""
    text = str(answer.get("ContentRange") or "").strip()
    found = _CONTENT_RANGE.fullmatch(text)
    if found:
        return int(found.group(1))
    if not text and (answer.get("ResponseMetadata") or {}).get("HTTPStatusCode", 200) == 200:
        return None
    return -1  # a partial answer that names no range: never the bytes asked for


def _range_error(uri: S3Uri, start: int, answer: dict[str, Any]) -> StorageError:
    got = answer.get("ContentRange") or "the whole object"
    return StorageError(
        f"reading {uri}: asked for the bytes from {start}, the store answered {got}",
        "the store does not honour HTTP Range requests as S3 does; check the endpoint (AWS_ENDPOINT_URL) or a proxy",
        code="RangeIgnored",
    )


@dataclass(frozen=True)
class ObjectInfo:
    """An object as a listing or HEAD shows it: ETag without quotes, sha256 from its metadata when HEAD saw one."""

    uri: S3Uri
    size: int
    etag: str
    sha256: str | None = None
    last_modified: float | None = None

    @property
    def md5(self) -> str | None:
        """The content MD5 when the ETag is one (single-part uploads without SSE-KMS), else None."""
        return self.etag if _MD5_ETAG.fullmatch(self.etag) else None


@dataclass(frozen=True)
class DownloadResult:
    """A finished download: its verified sha256, and how many bytes this call fetched (the rest was on disk)."""

    sha256: str
    fetched: int


def transfer_config(part_bytes: int = PART_BYTES, concurrency: int = CONCURRENCY) -> Any:
    """boto3's TransferConfig for parallel multipart uploads (and the part size/concurrency of downloads)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=part_bytes,
        max_concurrency=concurrency,
        use_threads=concurrency > 1,
    )


def _import_boto3() -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise StorageError(
            "S3 needs the boto3 package, which is not installed in this Python environment",
            "pip install boto3 (requirements.txt pins the version this project is tested with)",
        ) from exc
    return boto3


def _strip_etag(value: object) -> str:
    return str(value or "").strip('"')


def describe_error(exc: BaseException, uri: S3Uri | str, action: str) -> StorageError:
    """A StorageError for a failed request on `uri`: what failed, the store's error code, and what to check. A
    failure on this machine (an OSError of a local file) says so, with no AWS error code."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = str(uri)
    if isinstance(exc, StorageError):
        return exc  # already described
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{action} {where}: no AWS credentials were found ({type(exc).__name__})",
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run on an instance with a role",
            code=type(exc).__name__,
        )
    if isinstance(exc, EndpointConnectionError):
        return StorageError(
            f"{action} {where}: cannot reach the S3 endpoint ({exc})",
            "check the network, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the region",
            code="EndpointConnectionError",
        )
    if isinstance(exc.__context__, ClientError) and from_aws_sdk(exc) and not isinstance(exc, ClientError):
        exc = exc.__context__  # boto3's S3UploadFailedError re-raises a ClientError as text: use the original
    if not isinstance(exc, (ClientError, BotoCoreError)) and not from_aws_sdk(exc):
        return _local_error(exc, where, action)
    code, text = "", str(exc)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error") or {}
        code, text = str(error.get("Code") or ""), str(error.get("Message") or "")
    else:
        found = _CODE_IN_TEXT.search(str(exc))
        code = found.group(1) if found else type(exc).__name__
    if code in _NOT_FOUND:
        error = StorageError(
            f"{action} {where}: the object does not exist (AWS error {code})",
            "check the bucket and key (`python -m kohya_backend s3 ls s3://bucket/prefix/` lists them)",
            code=code,
        )
        error.http_status = 404
        return error
    if code in _NO_BUCKET:
        error = StorageError(
            f"{action} {where}: the bucket does not exist (AWS error {code})",
            "check the bucket name, and the endpoint (AWS_ENDPOINT_URL) and region it lives in",
            code=code,
        )
        error.http_status = 404
        return error
    if code in _DENIED:
        return StorageError(
            f"{action} {where}: access denied (AWS error {code}{': ' + text if text else ''})",
            "check the credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and that they may "
            "read (s3:GetObject, s3:ListBucket) or write (s3:PutObject) this bucket/prefix",
            code=code,
        )
    return StorageError(
        f"{action} {where} failed (AWS error {code or type(exc).__name__}: {text})",
        "retry; if it persists, check the bucket, the credentials and the endpoint",
        code=code or type(exc).__name__,
    )


def from_aws_sdk(exc: BaseException) -> bool:
    """True for exceptions boto3, botocore or s3transfer raise (their codes may be in their text)."""
    return type(exc).__module__.split(".")[0] in ("boto3", "botocore", "s3transfer")


def _local_error(exc: BaseException, where: str, action: str) -> StorageError:
    """A failure on this machine (a file that cannot be read or written, a full disk), not an answer of the store."""
    if isinstance(exc, OSError):
        path = f" ({exc.filename})" if exc.filename else ""
        return StorageError(
            f"{action} {where} failed on this machine: {exc.strerror or exc}{path} ({type(exc).__name__})",
            "check the local file or folder: that it exists, can be read or written, and the disk has room",
            code=type(exc).__name__,
        )
    return StorageError(
        f"{action} {where} failed: {type(exc).__name__}: {exc}",
        "retry; if it persists, see the host's log",
        code=type(exc).__name__,
    )


class S3Client:
    """boto3's S3 client plus this project's conventions (see the module doc). Thread-safe like boto3's client.

    `client` is a boto3 S3 client (default: from the standard chain with standard retries); `part_bytes` and
    `concurrency` size the parallel parts of uploads and downloads.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        part_bytes: int = PART_BYTES,
        concurrency: int = CONCURRENCY,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        if client is None:
            boto3 = _import_boto3()
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": max_attempts},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=max(10, concurrency * 2),
            )
            client = boto3.session.Session().client("s3", config=config)
        self.client = client
        self.part_bytes = part_bytes
        self.concurrency = concurrency
        self.transfer = transfer_config(part_bytes, concurrency)

    # -- reading --------------------------------------------------------------------------------------------

    def head(self, uri: S3Uri) -> ObjectInfo:
        """Size, ETag and sha256 metadata of one object; StorageError (404 for a missing key or bucket)."""
        try:
            answer = self.client.head_object(Bucket=uri.bucket, Key=uri.key)
        except Exception as exc:
            raise self._explain(exc, uri, "reading") from exc
        meta = {str(k).lower(): str(v) for k, v in (answer.get("Metadata") or {}).items()}
        modified = answer.get("LastModified")
        return ObjectInfo(
            uri=uri,
            size=int(answer["ContentLength"]),
            etag=_strip_etag(answer.get("ETag")),
            sha256=meta.get(SHA256_META),
            last_modified=modified.timestamp() if modified is not None else None,
        )

    def _explain(self, exc: BaseException, uri: S3Uri, action: str) -> StorageError:
        """describe_error, telling a missing bucket from a missing key when HEAD only said 404."""
        error = describe_error(exc, uri, action)
        if error.code in _NOT_FOUND:
            try:
                self.client.head_bucket(Bucket=uri.bucket)
            except Exception as bucket_exc:
                bucket_error = describe_error(bucket_exc, S3Uri(uri.bucket), action)
                if bucket_error.code in _NOT_FOUND or bucket_error.code in _NO_BUCKET:
                    missing = StorageError(
                        f"{action} {uri}: the bucket {uri.bucket!r} does not exist (AWS error NoSuchBucket)",
                        "check the bucket name, and the endpoint (AWS_ENDPOINT_URL) and region it lives in",
                        code="NoSuchBucket",
                    )
                    missing.http_status = 404
                    return missing
        return error

    def exists(self, uri: S3Uri) -> ObjectInfo | None:
        """head(uri), or None when there is no such object (other errors raise)."""
        try:
            return self.head(uri)
        except StorageError as exc:
            if exc.code in _NOT_FOUND:
                return None
            raise

    def list_objects(self, uri: S3Uri, *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Every object under `uri` taken as a prefix (all levels), page by page (ListObjectsV2 continuation)."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=uri.bucket, Prefix=uri.prefix(), PaginationConfig={"PageSize": page_size}
        )
        try:
            for page in pages:
                for item in page.get("Contents") or []:
                    modified = item.get("LastModified")
                    yield ObjectInfo(
                        uri=S3Uri(uri.bucket, str(item["Key"])),
                        size=int(item["Size"]),
                        etag=_strip_etag(item.get("ETag")),
                        last_modified=modified.timestamp() if modified is not None else None,
                    )
        except Exception as exc:
            raise describe_error(exc, uri, "listing") from exc

    def folders(self, uri: S3Uri) -> list[S3Uri]:
        """The immediate 'subfolders' (common prefixes) under `uri`, e.g. each dataset under datasets/."""
        paginator = self.client.get_paginator("list_objects_v2")
        found: list[S3Uri] = []
        try:
            for page in paginator.paginate(Bucket=uri.bucket, Prefix=uri.prefix(), Delimiter="/"):
                found.extend(S3Uri(uri.bucket, str(p["Prefix"])) for p in page.get("CommonPrefixes") or [])
        except Exception as exc:
            raise describe_error(exc, uri, "listing") from exc
        return found

    def read_range(self, uri: S3Uri, start: int, length: int, *, etag: str | None = None) -> bytes:
        """`length` bytes from `start` (fewer at the object's end) with one ranged GET."""
        if length <= 0:
            return b""
        args: dict[str, Any] = {
            "Bucket": uri.bucket,
            "Key": uri.key,
            "Range": f"bytes={start}-{start + length - 1}",
        }
        if etag:
            args["IfMatch"] = f'"{etag}"'
        try:
            answer = self.client.get_object(**args)
            body, first = answer["Body"], _range_start(answer)
            if (
                first is None and start == 0
            ):  # the whole object: its first `length` bytes are the ones asked for
                data = bytes(body.read(length))
                body.close()
                return data
            if first != start:
                body.close()
                raise _range_error(uri, start, answer)
            return bytes(body.read())
        except Exception as exc:
            raise describe_error(exc, uri, "reading") from exc

    # -- downloading ----------------------------------------------------------------------------------------

    def download(
        self,
        info: ObjectInfo,
        dest: Path,
        *,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> DownloadResult:
        """Fetch the object `info` describes into `dest` (atomically), continuing a `.part` file a cut download
        left; verified, see the module doc. DownloadCancelled when `cancelled()` turns true."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part, meta = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
        held = _held_bytes(part, meta, info)
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        if held:
            _hash_prefix(part, held, (sha, md5))
        else:
            part.unlink(missing_ok=True)
        meta.write_text(json.dumps({"uri": str(info.uri), "etag": info.etag, "size": info.size}), "utf-8")
        state = _Fetch(info, held, sha, md5, progress, cancelled)
        with open(part, "r+b" if held else "wb") as handle:
            handle.seek(held)
            handle.truncate()
            if progress is not None:
                progress(held, info.size)
            if info.size - held > self.part_bytes and self.concurrency > 1:
                self._fetch_parts(state, handle)
            else:
                self._fetch_stream(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        self._verify(state, part, meta)
        os.replace(part, dest)
        meta.unlink(missing_ok=True)
        return DownloadResult(state.sha.hexdigest(), state.fetched)

    def _fetch_stream(self, state: _Fetch, handle: Any) -> None:
        """One GET from the held offset (`Range: bytes=N-`), written as it arrives; a cut body continues. A store
        that ignores the Range (200, the whole object) is read from byte 0 again; one that answers other bytes than
        asked is refused; answers that bring no byte count as failed attempts."""
        info, attempts = state.info, 0
        while state.held < info.size:
            args: dict[str, Any] = {
                "Bucket": info.uri.bucket,
                "Key": info.uri.key,
                "IfMatch": f'"{info.etag}"',
            }
            if state.held:
                args["Range"] = f"bytes={state.held}-"
            arrived = state.fetched
            try:
                answer = self.client.get_object(**args)
                if state.held:
                    first = _range_start(answer)
                    if first is None:
                        state.restart(handle)
                    elif first != state.held:
                        answer["Body"].close()
                        raise _range_error(info.uri, state.held, answer)
                for block in answer["Body"].iter_chunks(_READ_BLOCK):
                    state.write(handle, block)
            except Exception as exc:
                if exc is state.stopped:
                    raise
                error = describe_error(exc, info.uri, "downloading")
                attempts += 1
                if error.code == "PreconditionFailed":
                    raise _changed(info) from exc
                if error.code in _NOT_FOUND | _NO_BUCKET | _DENIED or error.code == "RangeIgnored":
                    raise error from exc
                if attempts > STREAM_RETRIES:
                    raise error from exc
                handle.flush()
                continue
            if state.fetched == arrived and state.held < info.size:
                attempts += 1
                if attempts > STREAM_RETRIES:
                    raise StorageError(
                        f"downloading {info.uri}: the store answered {attempts} times without a byte "
                        f"(at {state.held} of {info.size} bytes)",
                        "the store (or a proxy) sends empty bodies; check the endpoint and retry later",
                        code="NoProgress",
                    )

    def _fetch_parts(self, state: _Fetch, handle: Any) -> None:
        """Parallel ranged GETs of `part_bytes` each, `concurrency` at a time, appended in order; a store that
        ignores Range gets one plain GET instead (_fetch_stream)."""
        info = state.info
        starts = list(range(state.held, info.size, self.part_bytes))
        try:
            with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="s3-download") as pool:
                for window in range(0, len(starts), self.concurrency):
                    batch = starts[window : window + self.concurrency]
                    futures = [
                        pool.submit(self._part, info, s, min(self.part_bytes, info.size - s)) for s in batch
                    ]
                    for future in futures:
                        state.write(handle, future.result())
        except StorageError as exc:
            if exc.code != "RangeIgnored":
                raise
            self._fetch_stream(state, handle)

    def _part(self, info: ObjectInfo, start: int, length: int) -> bytes:
        error: StorageError | None = None
        for _ in range(STREAM_RETRIES):
            try:
                data = self.read_range(info.uri, start, length, etag=info.etag)
            except StorageError as exc:
                if exc.code == "PreconditionFailed":
                    raise _changed(info) from exc
                if exc.code in _NOT_FOUND | _NO_BUCKET | _DENIED or exc.code == "RangeIgnored":
                    raise
                error = exc
                continue
            if len(data) == length:
                return data
            error = StorageError(f"downloading {info.uri}: a part came back short", "retry")
        raise error or StorageError(f"downloading {info.uri} failed", "retry")

    def _verify(self, state: _Fetch, part: Path, meta: Path) -> None:
        info = state.info
        problem = None
        if state.held != info.size:
            problem = f"{state.held} bytes arrived, the object has {info.size}"
        elif info.sha256 and state.sha.hexdigest() != info.sha256.lower():
            problem = (
                f"its sha256 is {state.sha.hexdigest()[:12]}..., its metadata says {info.sha256[:12]}..."
            )
        elif info.md5 and state.md5.hexdigest() != info.md5:
            problem = f"its MD5 is {state.md5.hexdigest()}, its ETag says {info.md5}"
        if problem:
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise StorageError(
                f"downloading {info.uri}: the bytes received are not the object ({problem})",
                "retry the download (the partial file was removed)",
                code="ChecksumMismatch",
            )

    # -- uploading ------------------------------------------------------------------------------------------

    def upload_file(
        self,
        path: Path,
        uri: S3Uri,
        *,
        sha256: str | None = None,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> bool:
        """Upload `path` to `uri` with its sha256 in the metadata; False (nothing sent) when the object already
        has that sha256 and size. Parallel multipart for large files (TransferConfig)."""
        from kohya_backend.models.hashing import sha256_file

        path = Path(path)
        size = path.stat().st_size
        digest = sha256 or sha256_file(path)
        existing = self.exists(uri)
        if existing is not None and existing.size == size and existing.sha256 == digest:
            if progress is not None:
                progress(size, size)
            return False
        sent = [0]
        lock = threading.Lock()
        stopped: list[BaseException] = []  # what the caller's callbacks raised: theirs, not an AWS error

        def callback(count: int) -> None:
            try:
                if cancelled is not None and cancelled():
                    raise DownloadCancelled(
                        f"uploading {path} to {uri} was cancelled", None, code="Cancelled"
                    )
                with lock:
                    sent[0] += count
                    done = sent[0]
                if progress is not None:
                    progress(min(done, size), size)
            except BaseException as exc:
                stopped.append(exc)
                raise

        try:
            self.client.upload_file(
                str(path),
                uri.bucket,
                uri.key,
                ExtraArgs={"Metadata": {SHA256_META: digest}},
                Config=self.transfer,
                Callback=callback,
            )
        except Exception as exc:
            if stopped:
                raise stopped[0] from None
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            raise describe_error(cause, uri, "uploading to") from exc
        if progress is not None:
            progress(size, size)
        return True


@dataclass
class _Fetch:
    """A download in progress: bytes held (a prefix of the object), running hashes, bytes fetched this call."""

    info: ObjectInfo
    held: int
    sha: Any
    md5: Any
    progress: Progress | None
    cancelled: Callable[[], bool] | None
    fetched: int = 0
    stopped: BaseException | None = None  # raised here or by the caller's callbacks: never retried

    def restart(self, handle: Any) -> None:
        """Start the file over (the store sent the whole object, not the rest): empty, hashes reset."""
        handle.seek(0)
        handle.truncate()
        self.held = 0
        self.sha, self.md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        if self.progress is not None:
            self.progress(0, self.info.size)

    def write(self, handle: Any, block: bytes) -> None:
        try:
            if self.cancelled is not None and self.cancelled():
                raise DownloadCancelled(
                    f"downloading {self.info.uri} was cancelled at {self.held} of {self.info.size} bytes",
                    "the bytes that arrived are kept; the next download continues from them",
                    code="Cancelled",
                )
            block = block[: max(0, self.info.size - self.held)]
            handle.write(block)
            self.sha.update(block)
            self.md5.update(block)
            self.held += len(block)
            self.fetched += len(block)
            if self.progress is not None:
                self.progress(self.held, self.info.size)
        except BaseException as exc:
            self.stopped = exc
            raise


def _changed(info: ObjectInfo) -> StorageError:
    return StorageError(
        f"downloading {info.uri}: the object changed while it was downloaded (its ETag is no longer {info.etag})",
        "start the job again: the new version is downloaded from the start",
        code="PreconditionFailed",
    )


def _held_bytes(part: Path, meta: Path, info: ObjectInfo) -> int:
    """Bytes of a previous attempt to keep: only when its record names the same object version."""
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
        size = part.stat().st_size
    except (OSError, ValueError):
        return 0
    same = isinstance(record, dict) and record.get("etag") == info.etag and record.get("size") == info.size
    return min(size, info.size) if same else 0


def _hash_prefix(part: Path, held: int, digests: tuple[Any, ...]) -> None:
    with open(part, "rb") as handle:
        left = held
        while left > 0 and (block := handle.read(min(_READ_BLOCK, left))):
            left -= len(block)
            for digest in digests:
                digest.update(block)
