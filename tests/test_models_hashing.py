"""Hashes match their definitions (reference/kohya.md) on files and bytes."""

import hashlib
from pathlib import Path

from kohya_backend.models.hashing import legacy_hash_bytes, legacy_hash_file, sha256_file


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_legacy_hash_reads_64k_at_1m(tmp_path: Path) -> None:
    data = bytes(0x100000) + b"\x01" * 0x10000 + b"\x02" * 100
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(b"\x01" * 0x10000).hexdigest()[:8]
    assert legacy_hash_file(path) == expected == legacy_hash_bytes(data)


def test_legacy_hash_of_small_file_hashes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(b"abc")
    assert legacy_hash_file(path) == hashlib.sha256(b"").hexdigest()[:8]
