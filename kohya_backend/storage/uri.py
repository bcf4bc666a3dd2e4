"""`s3://bucket/key` URIs, parsed strictly, and the one check that turns an S3 key into a safe relative path.

Both are torch- and boto3-free, so config validation and listings can use them. Bucket names follow S3's rules
for new buckets (3-63 characters, lowercase letters, digits, '.' and '-'); keys are at most 1024 UTF-8 bytes
without control characters. A key is attacker-controlled text: before one becomes a file name under a local
folder, `safe_relative_key` refuses anything that could leave it; before a client's URI is read or written with the
host's credentials, `confine_uri` refuses anything outside the areas it may name.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kohya_backend.errors import TrainManagementError

SCHEME = "s3://"
MAX_KEY_BYTES = 1024
MAX_COMPONENT_BYTES = 255
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_URI_HINT = "write it as s3://bucket/path/to/object, e.g. s3://my-bucket/models/sd15.safetensors"


class S3UriError(TrainManagementError):
    """Text that was meant as an s3:// URI but is not a valid one (the message says which part is wrong)."""


class UnsafeKey(TrainManagementError):
    """An S3 key that cannot become a path under a local folder ('..', absolute, backslashes, ...)."""


class OutsideRoot(TrainManagementError):
    """An s3:// URI from a client that is not inside the S3 areas it may name, or not in normal form."""


def is_s3_uri(value: object) -> bool:
    """True when `value` is text that starts with s3:// (any case): meant as an object, valid or not."""
    return isinstance(value, str) and value[: len(SCHEME)].lower() == SCHEME


def _bucket_problem(bucket: str) -> str | None:
    if not _BUCKET.fullmatch(bucket):
        return (
            "must be 3-63 lowercase letters, digits, '.' or '-', starting and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "must not contain '..', '.-' or '-.'"
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return None
    return "must not look like an IP address"


@dataclass(frozen=True, order=True)
class S3Uri:
    """One object (or, with an empty key or a key ending in '/', a prefix) in a bucket."""

    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    @property
    def name(self) -> str:
        """The last part of the key ('' for a bucket), e.g. 'sd15.safetensors'."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def prefix(self) -> str:
        """The key as a folder prefix: '' for the bucket, else the key ending in '/'."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"

    def child(self, relative: str) -> S3Uri:
        """The object `relative` below this URI taken as a folder."""
        return S3Uri(self.bucket, self.prefix() + relative.lstrip("/"))


def parse_s3_uri(value: object, *, what: str = "S3 URI") -> S3Uri:
    """Parse `s3://bucket[/key]` strictly; S3UriError says what is wrong (scheme, bucket name, key) and how to
    write it."""
    text = value if isinstance(value, str) else ""
    if not is_s3_uri(text):
        raise S3UriError(f"{what} {str(value)[:200]!r} does not start with s3://", _URI_HINT)
    if not text.startswith(SCHEME):
        raise S3UriError(f"{what} {text[:200]!r}: write the scheme in lowercase (s3://)", _URI_HINT)
    rest = text[len(SCHEME) :]
    bucket, _, key = rest.partition("/")
    problem = None
    if not bucket:
        problem = "has no bucket name"
    elif any(c in bucket for c in "?#@:") or bucket != bucket.strip():
        problem = f"has a bucket part {bucket!r} with a query, fragment, user, port or spaces"
    elif (why := _bucket_problem(bucket)) is not None:
        problem = f"has the bucket name {bucket!r}, which {why}"
    elif _CONTROL.search(key):
        problem = "has a control character in its key"
    elif len(key.encode("utf-8")) > MAX_KEY_BYTES:
        problem = f"has a key longer than {MAX_KEY_BYTES} bytes"
    elif key.startswith("/"):
        problem = "has '//' after the bucket name"
    if problem:
        raise S3UriError(f"{what} {text[:200]!r} {problem}", _URI_HINT)
    return S3Uri(bucket, key)


def safe_relative_key(relative: str, *, what: str = "S3 key") -> str:
    """`relative` (a key below a synced prefix) if it is a safe relative POSIX path, else UnsafeKey.

    Refused: empty, absolute ('/...'), backslashes, ':' (a Windows drive), '.' or '..' or empty components
    ('a//b'), control characters and components over 255 bytes. Such a key is never written anywhere.
    """
    problem = None
    if not relative:
        problem = "is empty"
    elif relative.startswith("/"):
        problem = "is absolute"
    elif "\\" in relative:
        problem = "contains a backslash"
    elif ":" in relative:
        problem = "contains ':' (a drive or stream name on Windows)"
    elif _CONTROL.search(relative):
        problem = "contains a control character"
    else:
        for part in relative.split("/"):
            if part in ("", ".", ".."):
                problem = "has an empty, '.' or '..' component"
                break
            if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
                problem = f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
                break
    if problem:
        raise UnsafeKey(
            f"{what} {relative[:200]!r} {problem}: it could be written outside the destination folder",
            "rename the object in the bucket (keys like 10_subject/image01.png), or sync another prefix",
        )
    return relative


def _relative_problem(relative: str) -> str | None:
    """Why a key below a root is not in normal form ('' parts, '.', '..', backslashes, percent-escapes), or None."""
    if _PERCENT.search(relative):
        return "has a percent-encoded part (e.g. %2e): write the key as it is stored"
    if "\\" in relative:
        return "has a backslash"
    for part in relative.removesuffix("/").split("/"):
        if part in ("", ".", ".."):
            return "has an empty ('//'), '.' or '..' part"
    return None


def confine_uri(
    value: object,
    roots: Sequence[S3Uri],
    *,
    what: str,
    folder: bool = False,
    root_itself: bool = False,
) -> S3Uri:
    """`value` parsed (S3UriError when it is no valid URI), if it lies strictly below one of `roots` (taken as
    folders, compared exactly: same bucket, key starting with the root's key and '/') and its part below the root is
    in normal form; else OutsideRoot. An object (`folder` False) must not end in '/'; a folder may be the root itself
    only with `root_itself`. S3 keys are case-sensitive and never normalised by S3, so nothing is normalised here:
    what is accepted is exactly the object that will be read or written."""
    uri = parse_s3_uri(value, what=what)
    places = " or ".join(str(r) for r in roots)
    if not folder and (not uri.key or uri.key.endswith("/")):
        raise OutsideRoot(
            f"{what} {uri} names a folder, not an object", f"give an object's full key below {places}"
        )
    key = uri.prefix() if folder else uri.key
    for root in roots:
        base = root.prefix()
        if uri.bucket != root.bucket or not key.startswith(base):
            continue
        relative = key[len(base) :]
        if not relative and not root_itself:
            raise OutsideRoot(
                f"{what} {uri} is the area itself", f"name one entry below it, e.g. {root.child('x/')}"
            )
        problem = _relative_problem(relative) if relative else None
        if problem:
            raise OutsideRoot(
                f"{what} {uri} {problem}",
                f"name the object below {root} by its plain key, e.g. {root.child('x')}",
            )
        return uri
    raise OutsideRoot(
        f"{what} {uri} is outside the S3 area{'s' if len(roots) > 1 else ''} it may name ({places})",
        f"put it below {places} (aws s3 cp / aws s3 sync, or Upload to S3 in the Datasets tab); the local command "
        "line (`python -m kohya_backend train` or `jobs`) may name any object",
    )
