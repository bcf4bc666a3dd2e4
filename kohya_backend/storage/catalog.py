"""What an S3 prefix offers the Model and Dataset lists: `prefix/models/**.safetensors|.ckpt` with size and family
(read from the safetensors header with two ranged GETs, never a download) and `prefix/datasets/<name>/` with a
count of its files and images. Listings are kept for a short while so a polling tab does not list S3 each time.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from kohya_backend.errors import StorageError, TrainManagementError
from kohya_backend.storage.client import ObjectInfo, S3Client
from kohya_backend.storage.uri import S3Uri

MODELS = "models"
DATASETS = "datasets"
LORAS = "loras"  # where the API and the tab may upload LoRAs (output_dir = "s3://...")
MODEL_SUFFIXES = (".safetensors", ".ckpt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # data/images.py's IMAGE_EXTENSIONS
MAX_HEADER_BYTES = 100 << 20
FIRST_READ = 256 << 10
LISTING_TTL_S = 30.0


def read_safetensors_keys(client: S3Client, info: ObjectInfo) -> list[str]:
    """The tensor names in a .safetensors object's header: its 8-byte length, then the JSON header, by ranged
    GETs (usually one) pinned to the object's ETag."""
    head = client.read_range(info.uri, 0, min(FIRST_READ, info.size), etag=info.etag)
    if len(head) < 8:
        raise StorageError(
            f"{info.uri} is too short to be a .safetensors file", "upload the checkpoint again"
        )
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES or 8 + length > info.size:
        raise StorageError(
            f"{info.uri} has no valid .safetensors header (it claims {length} bytes)",
            "upload the checkpoint again; it may be truncated or another format",
        )
    data = head[8 : 8 + length]
    if len(data) < length:
        data += client.read_range(info.uri, len(head), 8 + length - len(head), etag=info.etag)
    try:
        header = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StorageError(
            f"{info.uri} has a damaged .safetensors header ({exc})", "upload it again"
        ) from exc
    if not isinstance(header, dict):
        raise StorageError(f"{info.uri} has a damaged .safetensors header", "upload it again")
    return [k for k in header if k != "__metadata__"]


def model_family(client: S3Client, info: ObjectInfo) -> str | None:
    """The detected family of a checkpoint on S3 (models/detect.py on its header keys); None for a .ckpt (its
    keys need the whole pickle: the trainer checks it once downloaded)."""
    from kohya_backend.models.detect import detect_family

    if not info.uri.key.lower().endswith(".safetensors"):
        return None
    return detect_family(read_safetensors_keys(client, info))


class S3Catalog:
    """The models and datasets under one S3 prefix, as list entries marked `"source": "s3"`."""

    def __init__(
        self, prefix: S3Uri, client: Callable[[], S3Client], *, ttl_s: float = LISTING_TTL_S
    ) -> None:
        self.prefix = prefix
        self._client = client
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._listings: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._families: dict[tuple[str, str], tuple[str | None, str | None]] = {}

    @property
    def models_uri(self) -> S3Uri:
        return self.prefix.child(f"{MODELS}/")

    @property
    def datasets_uri(self) -> S3Uri:
        return self.prefix.child(f"{DATASETS}/")

    def _kept(self, what: str, build: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        with self._lock:
            hit = self._listings.get(what)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return [dict(e) for e in hit[1]]
        entries = build()
        with self._lock:
            self._listings[what] = (time.monotonic(), entries)
        return [dict(e) for e in entries]

    def forget(self) -> None:
        """Drop the kept listings (after an upload, so the lists show it at once)."""
        with self._lock:
            self._listings.clear()

    def model_names(self) -> list[str]:
        """The s3:// URIs of the checkpoints under prefix/models/ (one listing, no header read)."""
        return [e["name"] for e in self._kept("model_objects", self._model_objects)]

    def _model_objects(self) -> list[dict[str, Any]]:
        client = self._client()
        return [
            {"name": str(info.uri), "size": info.size, "etag": info.etag}
            for info in client.list_objects(self.models_uri)
            if info.uri.key.lower().endswith(MODEL_SUFFIXES)
        ]

    def models(self) -> list[dict[str, Any]]:
        """Checkpoints under prefix/models/ with size and family (or why the header cannot be read)."""
        return self._kept("models", self._models)

    def _models(self) -> list[dict[str, Any]]:
        client = self._client()
        out = []
        for item in self._model_objects():
            uri = S3Uri(self.prefix.bucket, str(item["name"])[len(f"s3://{self.prefix.bucket}/") :])
            info = ObjectInfo(uri, int(item["size"]), str(item["etag"]))
            family, error = self._family(client, info)
            out.append(
                {"name": str(uri), "source": "s3", "size": info.size, "family": family, "error": error}
            )
        return out

    def describe(self, uri: S3Uri) -> dict[str, Any]:
        """One checkpoint's entry (HEAD plus its header), e.g. for the tab's family check."""
        client = self._client()
        info = client.head(uri)
        family, error = self._family(client, info)
        return {"name": str(uri), "source": "s3", "size": info.size, "family": family, "error": error}

    def _family(self, client: S3Client, info: ObjectInfo) -> tuple[str | None, str | None]:
        key = (str(info.uri), info.etag)
        with self._lock:
            known = self._families.get(key)
        if known is not None:
            return known
        try:
            found: tuple[str | None, str | None] = (model_family(client, info), None)
        except TrainManagementError as exc:
            found = (None, str(exc))
        with self._lock:
            self._families[key] = found
        return found

    def dataset_names(self) -> list[str]:
        """The s3:// URIs of the dataset folders under prefix/datasets/."""
        return [e["name"] for e in self._kept("dataset_names", self._dataset_names)]

    def _dataset_names(self) -> list[dict[str, Any]]:
        return [{"name": str(uri).rstrip("/")} for uri in self._client().folders(self.datasets_uri)]

    def datasets(self) -> list[dict[str, Any]]:
        """Dataset folders under prefix/datasets/ with their file, image and byte counts per subfolder."""
        return self._kept("datasets", self._datasets)

    def _datasets(self) -> list[dict[str, Any]]:
        client = self._client()
        out = []
        for uri in client.folders(self.datasets_uri):
            subsets: dict[str, int] = {}
            files = size = 0
            for info in client.list_objects(uri):
                relative = info.uri.key[len(uri.prefix()) :]
                files += 1
                size += info.size
                if relative.lower().endswith(IMAGE_SUFFIXES) and "/" in relative:
                    folder = relative.split("/", 1)[0]
                    subsets[folder] = subsets.get(folder, 0) + 1
            out.append(
                {
                    "name": str(uri).rstrip("/"),
                    "source": "s3",
                    "summary": {
                        "files": files,
                        "size": size,
                        "images": sum(subsets.values()),
                        "subsets": subsets,
                    },
                    "error": None
                    if subsets
                    else {"message": f"{uri} has no <repeats>_<name>/ image folders"},
                }
            )
        return out
