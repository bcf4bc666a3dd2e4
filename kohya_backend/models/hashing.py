"""File hashes the WebUI and kohya's tools use to identify models and LoRAs."""

from __future__ import annotations

import hashlib
from pathlib import Path

_LEGACY_OFFSET = 0x100000
_LEGACY_SIZE = 0x10000
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Full-file sha256 (the WebUI's `sha256`, kohya's `ss_new_sd_model_hash`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def legacy_hash_bytes(data: bytes) -> str:
    """The WebUI's old short hash: first 8 hex of sha256 over 64 KiB at offset 1 MiB."""
    return hashlib.sha256(data[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_SIZE]).hexdigest()[:8]


def legacy_hash_file(path: Path) -> str:
    """`legacy_hash_bytes` read from a file without loading it whole (`ss_sd_model_hash`)."""
    with open(path, "rb") as fh:
        fh.seek(_LEGACY_OFFSET)
        return hashlib.sha256(fh.read(_LEGACY_SIZE)).hexdigest()[:8]
