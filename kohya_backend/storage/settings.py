"""Where the app's S3 prefix and cache come from: `serve --s3-uri`, the WebUI's "S3 prefix" setting, or
`HOME/cloud.toml` (first given wins). The file holds no secrets (credentials stay in boto3's chain):

    [s3]
    uri = "s3://my-bucket/train"   # models/ and datasets/ below it join the Model and Dataset lists
    cache_max_gb = 50              # the local cache of S3 objects (HOME/s3-cache), least recently used go first
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.storage.cache import DEFAULT_MAX_BYTES, S3Cache
from kohya_backend.storage.client import S3Client
from kohya_backend.storage.uri import S3Uri, parse_s3_uri

CLOUD_FILE = "cloud.toml"
SECTION = "s3"
KNOWN_KEYS = ("uri", "cache_max_gb")
CACHE_DIR = "s3-cache"
CACHE_ENV = "TRAIN_MANAGEMENT_S3_CACHE"


@dataclass(frozen=True)
class CloudSettings:
    """The S3 prefix the lists show (None: none) and the cache's folder and size cap."""

    prefix: S3Uri | None
    cache_dir: Path
    cache_max_bytes: int = DEFAULT_MAX_BYTES


def default_cache_dir() -> Path:
    """The cache used outside a home (the `train` and `s3` commands): $TRAIN_MANAGEMENT_S3_CACHE, else the user's
    cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "train-management" / CACHE_DIR


def read_cloud_section(home: Path, section: str, known: tuple[str, ...]) -> dict[str, Any]:
    """HOME/cloud.toml's `[section]` ({} without the file or the table); TrainManagementError naming the file for
    unreadable TOML, a section that is not a table, or a key not in `known` (a typo must not pass unnoticed)."""
    import tomlkit
    from tomlkit.exceptions import ParseError

    path = Path(home) / CLOUD_FILE
    if not path.is_file():
        return {}
    try:
        table = tomlkit.parse(path.read_text(encoding="utf-8")).unwrap().get(section) or {}
    except (ParseError, OSError, ValueError, TypeError) as exc:
        raise TrainManagementError(
            f"{path} cannot be read: {exc}", f'write it as [{section}] {known[0]} = "..."'
        ) from exc
    if not isinstance(table, dict):
        raise TrainManagementError(
            f"{path}: [{section}] must be a table", f'write [{section}] {known[0]} = "..."'
        )
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise TrainManagementError(
            f"{path}: [{section}] has unknown key(s) {', '.join(unknown)}", f"known keys: {', '.join(known)}"
        )
    return dict(table)


def load_cloud_settings(home: Path, s3_uri: str | None = None) -> CloudSettings:
    """The settings of a home: `s3_uri` (flag or WebUI setting) when given, else HOME/cloud.toml's [s3] uri."""
    path = Path(home) / CLOUD_FILE
    table = read_cloud_section(home, SECTION, KNOWN_KEYS)
    chosen = (s3_uri or "").strip() or str(table.get("uri") or "").strip()
    prefix = parse_s3_uri(chosen, what=f"the S3 prefix ({'setting' if s3_uri else path})") if chosen else None
    max_gb = table.get("cache_max_gb")
    if max_gb is not None and (
        isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or max_gb <= 0
    ):
        raise TrainManagementError(
            f"{path}: [s3] cache_max_gb must be a positive number", "e.g. cache_max_gb = 50"
        )
    max_bytes = int(float(max_gb) * (1 << 30)) if max_gb is not None else DEFAULT_MAX_BYTES
    return CloudSettings(prefix, Path(home) / CACHE_DIR, max_bytes)


class S3Access:
    """One S3 client and one cache for a process, made on first use (so nothing imports boto3 until S3 is used).

    `client_factory` makes the client (default: S3Client from boto3's standard chain).
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        cache_max_bytes: int = DEFAULT_MAX_BYTES,
        client_factory: Callable[[], S3Client] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_max_bytes = cache_max_bytes
        self._factory = client_factory
        self._client: S3Client | None = None
        self._cache: S3Cache | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: CloudSettings) -> S3Access:
        """The access a home's cloud settings describe."""
        return cls(settings.cache_dir, cache_max_bytes=settings.cache_max_bytes)

    def client(self) -> S3Client:
        """The S3 client (made once)."""
        with self._lock:
            if self._client is None:
                self._client = self._factory() if self._factory is not None else S3Client()
            return self._client

    def cache(self) -> S3Cache:
        """The object cache (opened once)."""
        with self._lock:
            if self._cache is None:
                self._cache = S3Cache(self.cache_dir, max_bytes=self.cache_max_bytes)
            return self._cache
