"""The worker's blob store on disk: chunked uploads at offsets, resume after a restart, verification, limits."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from kohya_backend.jobs.worker_protocol import (
    InvalidName,
    normalize_worker_url,
    validate_relpath,
    validate_sha256,
    validate_worker_name,
)
from kohya_backend.service.blobs import (
    BlobStore,
    BlobTooLarge,
    HashMismatch,
    InsufficientStorage,
    UploadConflict,
)

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


def _store(tmp_path: Path, **kwargs: int) -> BlobStore:
    kwargs.setdefault("reserve_bytes", 0)
    return BlobStore(tmp_path / "blobs", **kwargs)


def _send(store: BlobStore, sha: str, offset: int, data: bytes, size: int) -> int:
    upload = store.open_upload(sha, offset, size)
    try:
        upload.write(data)
        return upload.finish().offset
    finally:
        upload.close()


def test_chunks_at_offsets_make_a_verified_read_only_blob(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.state(SHA).offset == 0 and store.path(SHA) is None
    assert _send(store, SHA, 0, DATA[:100_000], len(DATA)) == 100_000
    partial = store.state(SHA)
    assert not partial.complete and partial.offset == 100_000 and partial.size == len(DATA)
    assert store.path(SHA) is None  # not usable before every byte arrived and matched
    assert _send(store, SHA, 100_000, DATA[100_000:], len(DATA)) == len(DATA)
    path = store.path(SHA)
    assert path is not None and path.read_bytes() == DATA
    assert not os.access(path, os.W_OK) or os.geteuid() == 0
    assert path.stat().st_mode & 0o222 == 0
    assert store.state(SHA).complete and not list(store.partial_root.iterdir())
    again = store.open_upload(SHA, 0, len(DATA))  # sending a complete blob again stores nothing
    try:
        assert again.already_complete  # its body is never read
    finally:
        again.close()
    assert _send(store, SHA, 0, DATA, len(DATA)) == len(DATA) and path.read_bytes() == DATA


def test_an_upload_continues_after_a_worker_restart_from_the_bytes_on_disk(tmp_path: Path) -> None:
    _send(_store(tmp_path), SHA, 0, DATA[:123_457], len(DATA))
    restarted = _store(tmp_path)  # the running hash is gone: the partial is re-read
    assert restarted.state(SHA).offset == 123_457
    assert _send(restarted, SHA, 123_457, DATA[123_457:], len(DATA)) == len(DATA)
    assert restarted.state(SHA).complete


def test_wrong_offsets_and_parallel_uploads_are_conflicts(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _send(store, SHA, 0, DATA[:1000], len(DATA))
    with pytest.raises(UploadConflict) as info:
        store.open_upload(SHA, 5000, len(DATA))
    assert info.value.offset == 1000
    with pytest.raises(UploadConflict):
        store.open_upload(SHA, 1000, len(DATA) + 1)  # another declared size
    first = store.open_upload(SHA, 1000, len(DATA))
    with pytest.raises(UploadConflict, match="another request"):
        store.open_upload(SHA, 1000, len(DATA))
    first.close()
    assert _send(store, SHA, 0, DATA, len(DATA)) == len(DATA)  # offset 0 starts over


def test_bytes_that_do_not_match_their_hash_are_discarded(tmp_path: Path) -> None:
    store = _store(tmp_path)
    wrong = bytearray(DATA)
    wrong[1234] ^= 0xFF
    with pytest.raises(HashMismatch):
        _send(store, SHA, 0, bytes(wrong), len(DATA))
    assert store.path(SHA) is None and store.state(SHA).offset == 0
    assert not list(store.partial_root.iterdir())


def test_size_limits_and_free_disk_are_checked_before_any_byte(tmp_path: Path) -> None:
    store = _store(tmp_path, max_blob_bytes=1000)
    with pytest.raises(BlobTooLarge, match="limit of 1000"):
        store.open_upload(SHA, 0, len(DATA))
    upload = _store(tmp_path / "b").open_upload(SHA, 0, 10)
    with pytest.raises(BlobTooLarge, match="more bytes"):
        upload.write(DATA[:11])
    upload.close()
    greedy = BlobStore(tmp_path / "c", reserve_bytes=1 << 60)
    with pytest.raises(InsufficientStorage, match="free"):
        greedy.open_upload(SHA, 0, len(DATA))
    assert not list(greedy.partial_root.iterdir())


def test_empty_files_are_blobs_too_and_stale_partials_are_pruned(tmp_path: Path) -> None:
    store = _store(tmp_path)
    empty = hashlib.sha256(b"").hexdigest()
    assert _send(store, empty, 0, b"", 0) == 0 and store.state(empty).complete
    _send(store, SHA, 0, DATA[:10], len(DATA))
    old = time.time() - 8 * 24 * 3600
    os.utime(store.partial_root / f"{SHA}.part", (old, old))
    assert store.remove_stale_partials(7 * 24 * 3600) == (1, 10) and store.state(SHA).offset == 0


@pytest.mark.parametrize(
    "bad",
    [
        "../x.png",
        "/etc/passwd",
        "a/../../b",
        "a\\b",
        "C:/x",
        ".hidden",
        "a/.cache/x",
        "",
        "a//b",
        "x/",
        "a\x00b",
    ],
)
def test_relative_paths_that_could_escape_are_refused(bad: str) -> None:
    with pytest.raises(InvalidName):
        validate_relpath(bad)


def test_names_hashes_and_urls() -> None:
    assert validate_relpath("10_cat/写真 (1).png") == "10_cat/写真 (1).png"
    assert validate_sha256(SHA) == SHA
    for bad in ("../" + SHA[3:], SHA.upper(), SHA[:-1]):
        with pytest.raises(InvalidName):
            validate_sha256(bad)
    assert validate_worker_name("gpu-box.2") == "gpu-box.2"
    with pytest.raises(InvalidName):
        validate_worker_name("../x")
    assert normalize_worker_url("http://gpu:7870/") == "http://gpu:7870"
    assert normalize_worker_url("https://h/gpu1/train-management/worker/v1") == "https://h/gpu1"
    for bad in ("ftp://h", "http://u:p@h", "http://h/../x", "http://h/?q=1", "gpu:7870"):
        with pytest.raises(InvalidName):
            normalize_worker_url(bad)


def test_uploads_in_flight_reserve_their_space_so_parallel_ones_cannot_overfill_the_disk(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path, max_blob_bytes=1 << 60)
    share = int(store.free_bytes() * 0.6)  # each alone fits; both together do not
    first = store.open_upload("a" * 64, 0, share)
    try:
        with pytest.raises(InsufficientStorage, match="promised to other uploads in flight"):
            store.open_upload("b" * 64, 0, share)
    finally:
        first.close()
    second = store.open_upload("b" * 64, 0, share)  # the first one's request ended: its reservation too
    second.close()


def test_running_hashes_of_abandoned_uploads_are_given_back_and_rebuilt_on_resume(tmp_path: Path) -> None:
    store = _store(tmp_path, session_idle_s=0.0)
    _send(store, SHA, 0, DATA[:50_000], len(DATA))
    assert store.sessions_held() == 1
    other = hashlib.sha256(b"other").hexdigest()
    _send(store, other, 0, b"oth", 5)  # any new request drops running hashes idle for too long
    assert store.sessions_held() == 1  # only the one just used
    assert _send(store, SHA, 50_000, DATA[50_000:], len(DATA)) == len(DATA)  # re-read from disk
    assert store.state(SHA).complete and store.path(SHA) is not None
