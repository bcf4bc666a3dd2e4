"""Hashes match their definitions (reference/kohya.md) on files and bytes."""

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import pytest

from kohya_backend.models import hashing
from kohya_backend.models.hashing import (
    CACHE_ENV,
    BackgroundSha256,
    Sha256Cache,
    default_cache_path,
    legacy_hash_bytes,
    legacy_hash_file,
    sha256_file,
)


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


def test_sha256_cache_is_used_while_size_and_mtime_hold(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"first content")
    cache = tmp_path / "cache" / "sha256.json"

    def remember(digest: str) -> None:
        store = Sha256Cache(cache)
        store.remember(path, digest)
        store.save()

    assert Sha256Cache(cache).get(path) is None
    remember("f" * 64)
    assert Sha256Cache(cache).get(path) == "f" * 64
    stat = path.stat()
    path.write_bytes(b"other content")  # same size; mtime restored: the cache cannot tell, by design
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert Sha256Cache(cache).get(path) == "f" * 64
    path.write_bytes(b"longer content now")
    assert Sha256Cache(cache).get(path) is None
    cache.write_text("{not json")
    assert Sha256Cache(cache).get(path) is None
    remember("e" * 64)  # a broken cache is replaced, not fatal
    assert Sha256Cache(cache).get(path) == "e" * 64


def test_background_sha256_computes_once_then_reads_the_cache(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    cache = tmp_path / "sha256.json"
    first = BackgroundSha256(path, cache)
    assert first.result() == hashlib.sha256(data).hexdigest()
    second = BackgroundSha256(path, cache)
    assert second._thread is None and second.result() == first.result()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_background_sha256_hashes_at_the_lowest_priority_and_leaves_the_caller_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(1 << 20))
    seen: list[tuple[int, int]] = []
    real = hashing.sha256_file

    def observed(file: Path) -> str:
        seen.append((threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return real(file)

    monkeypatch.setattr(hashing, "sha256_file", observed)
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    digest = BackgroundSha256(path, tmp_path / "sha256.json").result()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(seen) == 1 and seen[0][0] != threading.get_native_id()
    assert seen[0][1] == hashing.BACKGROUND_NICE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_background_sha256_reports_a_vanished_file(tmp_path: Path) -> None:
    job = BackgroundSha256(tmp_path / "missing.safetensors", tmp_path / "sha256.json")
    with pytest.raises(FileNotFoundError):
        job.result()


def test_default_cache_path_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "h.json"))
    assert default_cache_path() == tmp_path / "h.json"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "train-management" / "sha256.json"


def test_one_cache_for_many_files_tells_a_replaced_file_by_its_inode(tmp_path: Path) -> None:
    cache_file = tmp_path / "sha256.json"
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(bytes([i]) * 1000)
    cache = Sha256Cache(cache_file)
    digests = [cache.sha256(f) for f in files]
    assert digests == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert Sha256Cache(cache_file).get(files[0]) is None  # recorded in memory until save()
    cache.save()
    assert [Sha256Cache(cache_file).get(f) for f in files] == digests
    stat = files[0].stat()
    replacement = tmp_path / "new.png"
    replacement.write_bytes(b"\xff" * 1000)  # same size; copied over with the old mtime (cp -p, rsync)
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, files[0])
    assert Sha256Cache(cache_file).get(files[0]) is None
    assert Sha256Cache(cache_file).sha256(files[0]) == hashlib.sha256(b"\xff" * 1000).hexdigest()


def test_saving_the_cache_forgets_deleted_files(tmp_path: Path) -> None:
    cache = tmp_path / "sha256.json"
    kept, gone = tmp_path / "kept.bin", tmp_path / "gone.bin"
    kept.write_bytes(b"k")
    gone.write_bytes(b"g")
    first = Sha256Cache(cache)
    first.remember(gone, "a" * 64)
    first.save()
    gone.unlink()
    second = Sha256Cache(cache)
    second.remember(kept, "b" * 64)
    second.save()
    assert list(json.loads(cache.read_text())) == [str(kept.resolve())]
