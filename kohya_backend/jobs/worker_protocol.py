"""What the remote worker and its client agree on: URL prefix, headers, limits, and name and path validation.

Both sides validate every name that could reach a filesystem with the same functions: the worker refuses what a
client sends, and the client refuses what a worker answers (a worker is trusted with the token, not with paths).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from kohya_backend.errors import TrainManagementError

WORKER_PREFIX = "/train-management/worker/v1"
WORKER_API_VERSION = "1.0"
DEFAULT_WORKER_PORT = 7870
# The worker's defaults, kept here (no web framework imported) so the command line shows them in its help.
DEFAULT_WORKER_HOME = "train_management_worker"
DEFAULT_MAX_BLOB_BYTES = 64 << 30
DEFAULT_RESERVE_BYTES = 2 << 30
DEFAULT_GC_OLDER_THAN_DAYS = 7.0

OFFSET_HEADER = "Upload-Offset"
SIZE_HEADER = "Upload-Length"
SHA256_HEADER = "X-Content-Sha256"
STATUS_HEADER = "X-Job-Status"
LOG_SIZE_HEADER = "X-Log-Size"

MAX_INPUT_FILES = 100_000
MAX_PATH_DEPTH = 16
MAX_PATH_CHARS = 1024
MAX_COMPONENT_BYTES = 255

# Config keys whose values are files or folders the job reads (shipped as blobs) or writes (set by the worker).
INPUT_KEYS = (
    "pretrained_model_name_or_path",
    "train_data_dir",
    "reg_data_dir",
    "tokenizer_cache_dir",
    "network_weights",
    "sample_prompts",
)
OUTPUT_KEYS = ("output_dir", "logging_dir", "resume")
# Config keys naming files that name further paths (a dataset_config's image_dir): never accepted from a client.
LOCAL_ONLY_KEYS = ("dataset_config",)
FOLDER_KEYS = frozenset({"train_data_dir", "reg_data_dir", "tokenizer_cache_dir"})

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")  # also the name of each blob and by-sha256 entry
# Unicode letters and digits (\w) plus the punctuation file names of images and captions commonly carry.
_COMPONENT = re.compile(r"[\w\-. ()\[\],+@#&'!~=]+")
_URL_PATH = re.compile(r"(/(?!\.\.?(/|$))[A-Za-z0-9._~-]+)*/?")
_WORKER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


class InvalidName(TrainManagementError):
    """A name, hash or relative path from the other side of the wire that must not reach a filesystem."""


def validate_sha256(value: object) -> str:
    """Return `value` if it is 64 lowercase hex digits (a sha256), else raise InvalidName."""
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value):
        raise InvalidName(
            f"{str(value)[:80]!r} is not a sha256", "send the file's sha256 as 64 lowercase hex digits"
        )
    return value


def _component_problem(part: str) -> str | None:
    if part in ("", ".", ".."):
        return "has an empty, '.' or '..' component"
    if part.startswith("."):
        return "has a hidden component (starting with '.')"
    if part != part.strip() or part.endswith("."):
        return "has a component that starts or ends with a space, or ends with a dot"
    if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
        return f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
    if not _COMPONENT.fullmatch(part):
        bad = sorted({c for c in part if not _COMPONENT.fullmatch(c)})
        shown = " ".join(repr(c) for c in bad[:5])
        return f"contains characters that are not allowed ({shown})"
    return None


def validate_relpath(value: object, *, what: str = "path") -> str:
    """Return `value` if it is a safe relative POSIX path (no absolute, '..', hidden parts or odd characters)."""
    if not isinstance(value, str) or not value or len(value) > MAX_PATH_CHARS:
        raise InvalidName(
            f"{what} {str(value)[:80]!r} is empty, not text or longer than {MAX_PATH_CHARS} characters",
            "send a relative path such as '10_subject/image01.png'",
        )
    value = unicodedata.normalize("NFC", value)
    problem = None
    if value.startswith("/") or "\\" in value or ":" in value:
        problem = "is absolute or uses '\\' or ':'"
    else:
        parts = value.split("/")
        if len(parts) > MAX_PATH_DEPTH:
            problem = f"is deeper than {MAX_PATH_DEPTH} folders"
        for part in parts:
            problem = problem or _component_problem(part)
    if problem:
        raise InvalidName(
            f"{what} {value[:200]!r} {problem}",
            "use relative paths made of letters, digits, spaces and - _ . ( ) [ ] , + @ # & ' ! ~ =",
        )
    return value


def validate_file_name(value: object, *, what: str = "file name") -> str:
    """A single path component (no folders), validated like validate_relpath."""
    name = validate_relpath(value, what=what)
    if "/" in name:
        raise InvalidName(f"{what} {name!r} contains '/'", "send the bare file name")
    return name


def validate_worker_name(value: object) -> str:
    """Worker names: lowercase letters, digits, '-', '_' and '.', at most 63 characters."""
    if not isinstance(value, str) or not _WORKER_NAME.fullmatch(value):
        raise InvalidName(
            f"worker name {str(value)[:80]!r} is not valid",
            "use lowercase letters, digits, '-', '_' or '.', starting with a letter or digit (e.g. gpu-box)",
        )
    return value


def plain_http_warning(url: str) -> str | None:
    """A warning when requests to `url` carry the worker's token unencrypted off this machine (http:// to a host
    that is not loopback), else None."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(normalize_worker_url(url))
    host = parts.hostname or ""
    if parts.scheme != "http" or host == "localhost" or host.endswith(".localhost"):
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name
    return (
        f"the worker token goes to {host} over plain http: anyone on the network path can read it and use the "
        "worker; serve the worker behind a TLS reverse proxy (https://) or reach it through an SSH tunnel"
    )


def normalize_worker_url(value: object) -> str:
    """'http(s)://host[:port][/path]' without a trailing slash or the API prefix; refuses anything else."""
    from urllib.parse import urlsplit

    text = str(value or "").strip().rstrip("/")
    if text.endswith(WORKER_PREFIX):
        text = text[: -len(WORKER_PREFIX)].rstrip("/")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        parts, port = None, None
    problem = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        problem = "is not an http:// or https:// URL with a host"
    elif parts.username or parts.password:
        problem = "carries credentials; give the token separately"
    elif parts.query or parts.fragment or not _URL_PATH.fullmatch(parts.path):
        problem = "has a query, a fragment or an odd path"
    if problem or parts is None or not parts.hostname:
        raise InvalidName(
            f"worker URL {text[:200]!r} {problem}",
            f"use the URL the worker printed, e.g. http://gpu-box:{DEFAULT_WORKER_PORT}",
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    # A path is kept: a reverse proxy may serve the worker under one (https://host/gpu1).
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "") + parts.path.rstrip("/")


def read_token(path: Path, hint: str = "copy the worker's token file to this machine") -> str:
    """The token in a token file (its first line, stripped); refuses an unreadable or empty file with `hint`."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TrainManagementError(f"cannot read the token file {path}: {exc.strerror}", hint) from exc
    token = lines[0].strip() if lines else ""
    if not token:
        raise TrainManagementError(f"the token file {path} is empty", hint)
    return token
