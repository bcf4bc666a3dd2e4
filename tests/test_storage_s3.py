"""kohya_backend.storage against moto's S3 server over real HTTP: URIs, listing, uploads, resumable downloads,
the cache, prefix sync and the errors a user sees."""

# ruff: noqa: F811  (the moto fixtures are imported from s3_support and named as test arguments)

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from s3_support import (  # noqa: F401
    EmptyStore,
    Proxy,
    client_via,
    moto_url,
    new_bucket,
    raw_client,
    s3_env,
    set_auth,
)

from kohya_backend.errors import StorageError
from kohya_backend.storage.cache import S3Cache
from kohya_backend.storage.client import ObjectInfo, S3Client
from kohya_backend.storage.sync import sync_prefix, upload_folder
from kohya_backend.storage.uri import (
    OutsideRoot,
    S3Uri,
    S3UriError,
    UnsafeKey,
    confine_uri,
    parse_s3_uri,
    safe_relative_key,
)

MB = 1 << 20


def _blob(size: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]


def test_storage_imports_nothing_from_the_layers_that_use_it() -> None:
    """jobs/, service/, ui/ and the trainer build on storage/; an import back (file_lock once came from
    jobs/registry) would tie the layers in a knot."""
    import ast

    import kohya_backend.storage

    above = ("kohya_backend.jobs", "kohya_backend.service", "kohya_backend.ui", "kohya_backend.train")
    for path in sorted(Path(kohya_backend.storage.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.startswith(above)], (path.name, names)


# -- URIs and keys --------------------------------------------------------------------------------------------


def test_uris_parse_strictly() -> None:
    assert parse_s3_uri("s3://my-bucket/models/a b.safetensors") == S3Uri(
        "my-bucket", "models/a b.safetensors"
    )
    assert parse_s3_uri("s3://my.bucket") == S3Uri("my.bucket", "")
    assert str(S3Uri("b-1", "x/y")) == "s3://b-1/x/y" and S3Uri("b-1", "x/y/").name == "y"
    assert S3Uri("bkt", "p").child("models/") == S3Uri("bkt", "p/models/")
    bad = {
        "https://bkt/key": "does not start with s3://",
        "S3://bkt/key": "lowercase",
        "s3://": "no bucket",
        "s3:///key": "no bucket",
        "s3://Bucket/key": "bucket name",
        "s3://ab/key": "bucket name",
        "s3://bk..t/key": "'..'",
        "s3://192.168.1.1/key": "IP address",
        "s3://bkt:9000/key": "port",
        "s3://bkt//key": "'//'",
        "s3://bkt/a\nb": "control character",
        "s3://bkt/" + "k" * 1025: "longer than 1024",
    }
    for text, words in bad.items():
        with pytest.raises(S3UriError) as caught:
            parse_s3_uri(text)
        assert words in caught.value.message, (text, caught.value.message)
        assert "s3://bucket/" in (caught.value.hint or "")


def test_keys_that_could_leave_a_folder_are_refused() -> None:
    assert safe_relative_key("10_cat/a b (1).png") == "10_cat/a b (1).png"
    for key in (
        "../evil.png",
        "10_cat/../../x",
        "/etc/passwd",
        "a\\..\\b",
        "C:/x",
        "a//b",
        "./a",
        "a/\x00b",
        "",
    ):
        with pytest.raises(UnsafeKey):
            safe_relative_key(key)


def test_client_uris_are_confined_to_normal_keys_below_their_areas() -> None:
    models = [S3Uri("bkt", "train/models/")]
    for good in ("s3://bkt/train/models/a.safetensors", "s3://bkt/train/models/sd 1.5/a b.ckpt"):
        assert str(confine_uri(good, models, what="model")) == good
    refused = {
        "s3://bkt/train-other/models/a.safetensors": "outside",  # the prefix as a string, not as a folder
        "s3://bkt/train/models-old/a.safetensors": "outside",
        "s3://other/train/models/a.safetensors": "outside",  # another bucket, same keys
        "s3://bkt/Train/models/a.safetensors": "outside",  # keys are case-sensitive
        "s3://bkt/train/a.safetensors": "outside",
        "s3://bkt/train/models/../secret.safetensors": "'..'",
        "s3://bkt/train/models/sub/../../x": "'..'",
        "s3://bkt/train/models/./a.safetensors": "'.'",
        "s3://bkt/train/models//a.safetensors": "'//'",
        "s3://bkt/train/models/%2e%2e/x": "percent-encoded",
        "s3://bkt/train/models/%2E%2E%2Fx": "percent-encoded",
        "s3://bkt/train/models/a\\..\\x": "backslash",
        "s3://bkt/train/models/": "folder",
        "s3://bkt/train/models": "outside",
    }
    for text, words in refused.items():
        with pytest.raises(OutsideRoot) as caught:
            confine_uri(text, models, what="model")
        assert words in caught.value.message and "s3://bkt/train/models/" in (caught.value.hint or ""), text
    for text in ("s3://Bkt/train/models/a.safetensors", "S3://bkt/train/models/a.safetensors"):
        with pytest.raises(S3UriError):  # a bucket differing in case is no valid bucket name
            confine_uri(text, models, what="model")
    # Folders: a dataset below the area (with or without its trailing '/'), never the area itself; output_dir may be
    # the area itself.
    datasets = [S3Uri("bkt", "train/datasets/")]
    assert confine_uri("s3://bkt/train/datasets/cats", datasets, what="dataset", folder=True)
    assert confine_uri("s3://bkt/train/datasets/cats/", datasets, what="dataset", folder=True)
    for text in ("s3://bkt/train/datasets/", "s3://bkt/train/datasets", "s3://bkt/train/datasets/cats//"):
        with pytest.raises(OutsideRoot):
            confine_uri(text, datasets, what="dataset", folder=True)
    loras = [S3Uri("bkt", "train/loras/")]
    for text in ("s3://bkt/train/loras", "s3://bkt/train/loras/", "s3://bkt/train/loras/mine/"):
        assert confine_uri(text, loras, what="output_dir", folder=True, root_itself=True)
    with pytest.raises(OutsideRoot):
        confine_uri("s3://bkt/train/lorasx/", loras, what="output_dir", folder=True, root_itself=True)
    # A prefix at the bucket's root: its areas are models/, datasets/, ...
    assert confine_uri("s3://bkt/models/a.ckpt", [S3Uri("bkt").child("models/")], what="model")


# -- listing, uploads and downloads ---------------------------------------------------------------------------


def test_listing_2000_objects_pages_through_all_of_them(s3_env: str) -> None:
    bucket = new_bucket(s3_env)
    raw = raw_client(s3_env)
    keys = [f"many/{i:05d}.txt" for i in range(2000)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: raw.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))
    raw.put_object(Bucket=bucket, Key="other/x.txt", Body=b"x")
    client = S3Client()
    calls: list[str] = []
    client.client.meta.events.register("after-call.s3.ListObjectsV2", lambda **kw: calls.append("page"))
    listed = [info.uri.key for info in client.list_objects(S3Uri(bucket, "many"), page_size=700)]
    assert listed == keys  # every object once, in order, nothing from other/
    assert len(calls) == 3  # 700 + 700 + 600
    assert all(info.size == 14 for info in client.list_objects(S3Uri(bucket, "many/00")))


def test_upload_records_sha256_and_never_sends_the_same_file_twice(s3_env: str, tmp_path: Path) -> None:
    bucket = new_bucket(s3_env)
    client = S3Client(part_bytes=5 * MB, concurrency=4)
    path = tmp_path / "model.safetensors"
    data = _blob(12 * MB)  # under the multipart threshold: one PUT (the 40 MB file below goes in parts)
    path.write_bytes(data)
    uri = S3Uri(bucket, "models/model.safetensors")
    seen: list[tuple[int, int]] = []
    assert client.upload_file(path, uri, progress=lambda d, t: seen.append((d, t)))
    info = client.head(uri)
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.size == len(data)
    assert seen[-1] == (len(data), len(data))
    puts: list[str] = []
    client.client.meta.events.register("before-call.s3.PutObject", lambda **kw: puts.append("put"))
    assert not client.upload_file(path, uri)  # same sha256 and size: nothing sent
    assert puts == []
    path.write_bytes(data[:-1] + b"!")
    assert client.upload_file(path, uri) and puts == ["put"]
    big = tmp_path / "big.bin"
    big.write_bytes(_blob(40 * MB, seed=1))
    parts: list[str] = []
    client.client.meta.events.register("before-call.s3.UploadPart", lambda **kw: parts.append("part"))
    assert client.upload_file(big, S3Uri(bucket, "big.bin"))
    assert len(parts) == 8  # 40 MB in 5 MB parts, sent by TransferConfig's threads
    assert client.head(S3Uri(bucket, "big.bin")).sha256 == hashlib.sha256(big.read_bytes()).hexdigest()


def test_a_partial_download_on_disk_is_continued_from_its_offset(s3_env: str, tmp_path: Path) -> None:
    bucket = new_bucket(s3_env)
    data = _blob(3 * MB + 123)
    raw_client(s3_env).put_object(Bucket=bucket, Key="m.bin", Body=data)
    host, port = s3_env.removeprefix("http://").split(":")
    proxy = Proxy((host, int(port)))
    try:
        client = client_via(proxy.url, part_bytes=8 * MB, concurrency=1)
        info = client.head(S3Uri(bucket, "m.bin"))
        dest = tmp_path / "m.bin"
        held = MB + 7
        (tmp_path / "m.bin.part").write_bytes(data[:held])
        (tmp_path / "m.bin.part.json").write_text(json.dumps({"etag": info.etag, "size": info.size}))
        result = client.download(info, dest)
        assert dest.read_bytes() == data and not (tmp_path / "m.bin.part").exists()
        assert result.fetched == len(data) - held
        assert proxy.ranges() == [f"bytes={held}-"]
        assert proxy.downstream_bytes < len(data) - held + 4096  # the body was only the remainder
        # A .part of another object version (its ETag changed) is not trusted: the download starts over.
        (tmp_path / "n.bin.part").write_bytes(b"x" * held)
        (tmp_path / "n.bin.part.json").write_text(json.dumps({"etag": "other", "size": info.size}))
        again = client.download(info, tmp_path / "n.bin")
        assert again.fetched == len(data) and (tmp_path / "n.bin").read_bytes() == data
    finally:
        proxy.close()


def test_a_download_cut_mid_body_resumes_where_it_stopped(s3_env: str, tmp_path: Path) -> None:
    bucket = new_bucket(s3_env)
    data = _blob(2 * MB + 5)
    raw_client(s3_env).put_object(Bucket=bucket, Key="d/cut.bin", Body=data)
    host, port = s3_env.removeprefix("http://").split(":")
    proxy = Proxy((host, int(port)), cut_path=f"/{bucket}/d/cut.bin", cut_after=700_000)
    try:
        client = client_via(proxy.url, concurrency=1)
        info = client.head(S3Uri(bucket, "d/cut.bin"))
        result = client.download(info, tmp_path / "cut.bin")
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert (tmp_path / "cut.bin").read_bytes() == data
    ranges = proxy.ranges()
    assert ranges[0] == "" and len(ranges) == 2  # the first GET was cut; one ranged GET fetched the rest
    offset = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 600_000 < offset < 700_000  # it continued from what had arrived, not from 0
    assert result.fetched == len(data)  # no byte was fetched twice


def test_a_store_that_ignores_range_is_read_from_byte_0_not_appended_at_the_offset(
    s3_env: str, tmp_path: Path
) -> None:
    bucket = new_bucket(s3_env)
    data = _blob(3 * MB + 5, seed=4)
    raw_client(s3_env).put_object(Bucket=bucket, Key="r.bin", Body=data)
    host, port = s3_env.removeprefix("http://").split(":")
    proxy = Proxy((host, int(port)), strip_range=True)  # the store answers every GET with the whole object
    try:
        stream = client_via(proxy.url, concurrency=1)
        info = stream.head(S3Uri(bucket, "r.bin"))
        held = MB + 7
        (tmp_path / "r.bin.part").write_bytes(data[:held])  # a cut download's bytes, of this very version
        (tmp_path / "r.bin.part.json").write_text(json.dumps({"etag": info.etag, "size": info.size}))
        result = stream.download(info, tmp_path / "r.bin")
        assert proxy.ranges() == [f"bytes={held}-"]  # it asked for the rest, got everything, and started over
        assert (tmp_path / "r.bin").read_bytes() == data and result.fetched == len(data)
        assert result.sha256 == hashlib.sha256(data).hexdigest()
        parts = client_via(proxy.url, part_bytes=MB, concurrency=4)  # parallel parts fall back to one GET
        result = parts.download(info, tmp_path / "p.bin")
        assert (tmp_path / "p.bin").read_bytes() == data and result.sha256 == hashlib.sha256(data).hexdigest()
        assert (
            parts.read_range(info.uri, 0, 10) == data[:10]
        )  # the first bytes of a whole object are the ones
        with pytest.raises(StorageError) as caught:
            parts.read_range(info.uri, 10, 5)
        assert caught.value.code == "RangeIgnored" and "the whole object" in caught.value.message
    finally:
        proxy.close()


def test_a_store_that_sends_empty_bodies_ends_the_download_instead_of_looping(tmp_path: Path) -> None:
    store = EmptyStore(empty_answers=20)  # after 20 empty answers it fails every GET with 500
    try:
        client = client_via(store.url, concurrency=1)
        info = ObjectInfo(S3Uri("tm-bucket", "m.bin"), 100, "0123456789abcdef0123456789abcdef")
        with pytest.raises(StorageError) as caught:
            client.download(info, tmp_path / "m.bin")
    finally:
        store.close()
    assert caught.value.code == "NoProgress" and "without a byte" in caught.value.message
    assert store.gets <= 20


def test_parallel_parts_download_and_verification(s3_env: str, tmp_path: Path) -> None:
    bucket = new_bucket(s3_env)
    data = _blob(5 * MB + 3, seed=2)
    raw = raw_client(s3_env)
    raw.put_object(
        Bucket=bucket, Key="p.bin", Body=data, Metadata={"sha256": hashlib.sha256(data).hexdigest()}
    )
    client = S3Client(part_bytes=MB, concurrency=4)
    ranged: list[str] = []
    client.client.meta.events.register(
        "before-call.s3.GetObject", lambda params, **kw: ranged.append(params["headers"].get("Range", ""))
    )
    result = client.download(client.head(S3Uri(bucket, "p.bin")), tmp_path / "p.bin")
    assert (tmp_path / "p.bin").read_bytes() == data and result.fetched == len(data)
    assert len(ranged) == 6 and ranged[0] == f"bytes=0-{MB - 1}"
    # Metadata that does not match the bytes: the download is refused and nothing is left behind.
    raw.put_object(Bucket=bucket, Key="lie.bin", Body=b"abc", Metadata={"sha256": "0" * 64})
    with pytest.raises(StorageError) as caught:
        client.download(client.head(S3Uri(bucket, "lie.bin")), tmp_path / "lie.bin")
    assert caught.value.code == "ChecksumMismatch" and not list(tmp_path.glob("lie.bin*"))


class _HostStopping(Exception):
    """What a caller's callback raises to abandon a transfer (the SageMaker session's shutdown)."""


def test_what_the_callers_callbacks_raise_comes_out_unchanged_and_is_not_retried(
    s3_env: str, tmp_path: Path
) -> None:
    bucket = new_bucket(s3_env)
    client = S3Client(concurrency=1)
    path = tmp_path / "up.bin"
    path.write_bytes(_blob(MB))

    def stop(done: int = 1, _total: int = 0) -> bool:
        if done:
            raise _HostStopping()
        return False

    with pytest.raises(_HostStopping):  # not a StorageError saying "AWS error _HostStopping"
        client.upload_file(path, S3Uri(bucket, "up.bin"), cancelled=stop)
    client.upload_file(path, S3Uri(bucket, "up.bin"))
    gets: list[str] = []
    client.client.meta.events.register("before-call.s3.GetObject", lambda **kw: gets.append("get"))
    with pytest.raises(_HostStopping):
        client.download(client.head(S3Uri(bucket, "up.bin")), tmp_path / "down.bin", progress=stop)
    assert gets == ["get"]  # a callback's refusal is not a network error to retry


def test_missing_key_missing_bucket_and_bad_credentials_each_give_one_clear_error(
    s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(s3_env)
    client = S3Client()
    with pytest.raises(StorageError) as missing:
        client.head(S3Uri(bucket, "models/nope.safetensors"))
    assert missing.value.code == "404" and f"s3://{bucket}/models/nope.safetensors" in missing.value.message
    assert "does not exist" in missing.value.message and missing.value.http_status == 404
    with pytest.raises(StorageError) as no_bucket:
        client.head(S3Uri("tm-no-such-bucket", "x"))
    assert no_bucket.value.code == "NoSuchBucket" and "tm-no-such-bucket" in no_bucket.value.message
    with pytest.raises(StorageError) as no_bucket_list:
        list(client.list_objects(S3Uri("tm-no-such-bucket", "x/")))
    assert no_bucket_list.value.code == "NoSuchBucket"
    set_auth(s3_env, 0)  # from now on moto checks the key, the signature and IAM policies
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        with pytest.raises(StorageError) as denied:
            S3Client().head(S3Uri(bucket, "x"))
    finally:
        set_auth(s3_env, float("inf"))
    assert denied.value.code in ("InvalidAccessKeyId", "403")
    assert "access denied" in denied.value.message and f"s3://{bucket}/x" in denied.value.message
    assert "AWS_PROFILE" in (denied.value.hint or "")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError) as none:
        S3Client().head(S3Uri(bucket, "x"))
    assert none.value.code == "NoCredentialsError" and "no AWS credentials" in none.value.message


def test_a_failure_on_this_machine_is_not_called_an_aws_error(s3_env: str, tmp_path: Path) -> None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    from kohya_backend.storage.client import describe_error

    bucket = new_bucket(s3_env)
    folder = tmp_path / "photo (AccessDenied)"  # words in brackets in a local error's text are no AWS code
    folder.mkdir()
    with pytest.raises(StorageError) as caught:
        S3Client().upload_file(folder, S3Uri(bucket, "x.png"), sha256="0" * 64)  # boto3 cannot read a folder
    error = caught.value
    assert error.code == "IsADirectoryError" and "AWS error" not in error.message, error.message
    assert "on this machine" in error.message and str(folder) in error.message
    assert "access denied" not in error.message and "local file" in (error.hint or "")
    # boto3 re-raises the store's refusal of an upload as S3UploadFailedError text: the original code is kept.
    try:
        try:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")
        except ClientError as refused:
            raise S3UploadFailedError(f"Failed to upload x to {bucket}/x: {refused}") from None
    except S3UploadFailedError as exc:
        denied = describe_error(exc, S3Uri(bucket, "x"), "uploading to")
    assert denied.code == "AccessDenied" and "access denied (AWS error AccessDenied: no)" in denied.message


# -- the cache and prefix sync --------------------------------------------------------------------------------


def test_the_cache_downloads_once_shares_equal_files_and_evicts_least_recently_used(
    s3_env: str, tmp_path: Path
) -> None:
    bucket = new_bucket(s3_env)
    raw = raw_client(s3_env)
    for key, seed in (("a.bin", 1), ("same-as-a.bin", 1), ("b.bin", 2), ("c.bin", 3)):
        raw.put_object(Bucket=bucket, Key=key, Body=_blob(MB, seed))
    client = S3Client()
    cache = S3Cache(tmp_path / "cache", max_bytes=2 * MB)
    info = {k: client.head(S3Uri(bucket, k)) for k in ("a.bin", "same-as-a.bin", "b.bin", "c.bin")}
    job = tmp_path / "job"
    first = cache.fetch(client, info["a.bin"], job / "a.bin")
    assert first.fetched == MB and (job / "a.bin").read_bytes() == _blob(MB, 1)
    assert first.path.stat().st_mode & 0o222 == 0  # read-only (os.access says writable to root)
    again = cache.fetch(client, info["a.bin"], job / "a.bin")
    assert again.fetched == 0 and again.unchanged  # the second time: nothing downloaded, nothing linked
    twin = cache.fetch(client, info["same-as-a.bin"], job / "twin.bin")
    assert twin.path == first.path and cache.usage() == MB  # one copy for two keys
    assert os.path.samefile(job / "twin.bin", job / "a.bin") and not twin.unchanged
    cache.fetch(client, info["b.bin"], job / "b.bin")
    cache.fetch(client, info["a.bin"], job / "a.bin")  # a is now more recently used than b
    cache.fetch(client, info["c.bin"], job / "c.bin")  # over 2 MB: b (least recently used) goes
    assert cache.usage() == 2 * MB
    assert cache.lookup(info["b.bin"]) is None and cache.lookup(info["a.bin"]) is not None
    raw.put_object(Bucket=bucket, Key="a.bin", Body=_blob(MB, 9))  # a new version: new ETag
    assert (job / "b.bin").read_bytes() == _blob(MB, 2)  # what a job was given stays when its blob goes
    fresh = cache.fetch(client, client.head(S3Uri(bucket, "a.bin")), job / "a.bin")
    assert fresh.fetched == MB and (job / "a.bin").read_bytes() == _blob(MB, 9)


def test_eviction_waits_while_a_fetched_blob_is_being_linked(
    s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import kohya_backend.storage.cache as cache_module

    bucket = new_bucket(s3_env)
    raw_client(s3_env).put_object(Bucket=bucket, Key="m.bin", Body=_blob(MB, 5))
    client = S3Client()
    info = client.head(S3Uri(bucket, "m.bin"))
    cache = S3Cache(tmp_path / "cache", max_bytes=0)  # every blob is over the cap once nobody keeps it
    cache.fetch(client, info, tmp_path / "first.bin")  # cached (the fetch keeps its own blob)
    link, waited, evictors = cache_module.link_file, [], []

    def link_while_another_process_evicts(source: Path, dest: Path) -> None:
        # Another process (its own S3Cache on the same folder) evicts everything just before this link.
        evictor = threading.Thread(target=S3Cache(cache.root, max_bytes=0).evict)
        evictor.start()
        evictor.join(1.0)
        waited.append(evictor.is_alive())
        evictors.append(evictor)
        link(source, dest)

    monkeypatch.setattr(cache_module, "link_file", link_while_another_process_evicts)
    hit = cache.fetch(client, info, tmp_path / "hit.bin")  # found in the cache, then linked
    evictors[-1].join(30)
    assert hit.fetched == 0 and (tmp_path / "hit.bin").read_bytes() == _blob(MB, 5)
    assert cache.lookup(info) is None  # the eviction did happen, after the link
    miss = cache.fetch(client, info, tmp_path / "miss.bin")  # downloaded, stored, then linked
    evictors[-1].join(30)
    assert miss.fetched == MB and (tmp_path / "miss.bin").read_bytes() == _blob(MB, 5)
    assert waited == [True, True]  # each eviction waited for the link


def test_a_download_another_process_holds_is_waited_for_not_written_twice(
    s3_env: str, tmp_path: Path
) -> None:
    import threading

    from kohya_backend.locks import file_lock
    from kohya_backend.storage.cache import _object_id

    bucket = new_bucket(s3_env)
    raw_client(s3_env).put_object(Bucket=bucket, Key="m.bin", Body=_blob(MB))
    client = S3Client()
    info = client.head(S3Uri(bucket, "m.bin"))
    cache = S3Cache(tmp_path / "cache")
    got: list[int] = []
    worker = threading.Thread(
        target=lambda: got.append(cache.fetch(client, info, tmp_path / "m.bin").fetched)
    )
    # flock locks conflict between open files even in one process: this plays another `train` command downloading
    # the same object version into the same .part file.
    with file_lock(cache.partial / _object_id(info)):
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and not list(cache.partial.glob("*.part"))  # waiting, nothing written
    worker.join(30)
    assert got == [MB] and cache.lookup(info) is not None


def test_sync_downloads_only_changed_files_and_refuses_escaping_keys(s3_env: str, tmp_path: Path) -> None:
    bucket = new_bucket(s3_env)
    raw = raw_client(s3_env)
    files = {"10_cat/a.png": b"A" * 1000, "10_cat/a.txt": b"a cat", "5_dog/b.png": b"B" * 2000}
    for name, body in files.items():
        raw.put_object(Bucket=bucket, Key=f"datasets/pets/{name}", Body=body)
    raw.put_object(Bucket=bucket, Key="datasets/pets/.DS_Store", Body=b"junk")
    raw.put_object(Bucket=bucket, Key="datasets/pets/5_dog/", Body=b"")  # a console-made "folder"
    client, cache = S3Client(), S3Cache(tmp_path / "cache")
    dest = tmp_path / "pets"
    first = sync_prefix(client, cache, S3Uri(bucket, "datasets/pets"), dest)
    assert first.files == 3 and first.transferred == 3005
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    (dest / "stray.txt").write_text("left over")
    raw.put_object(Bucket=bucket, Key="datasets/pets/10_cat/a.txt", Body=b"a grey cat")
    raw.delete_object(Bucket=bucket, Key="datasets/pets/5_dog/b.png")
    second = sync_prefix(client, cache, S3Uri(bucket, "datasets/pets/"), dest, delete=True)
    assert second.transferred == len(b"a grey cat") and second.unchanged == 1
    assert (dest / "10_cat/a.txt").read_bytes() == b"a grey cat"
    assert not (dest / "5_dog").exists() and not (dest / "stray.txt").exists()
    assert second.removed == ["5_dog/b.png", "stray.txt"]
    for evil in (
        "datasets/evil/10_x/../../../../outside.txt",
        "datasets/evil2//abs.txt",
        "datasets/evil3/a\\..\\b",
    ):
        raw.put_object(Bucket=bucket, Key=evil, Body=b"owned")
        prefix = evil.split("/")[0] + "/" + evil.split("/")[1]
        target = tmp_path / "evil"
        with pytest.raises(UnsafeKey):
            sync_prefix(client, cache, S3Uri(bucket, prefix), target)
        assert not list(tmp_path.rglob("outside.txt")) and not list(target.rglob("*"))


def test_sync_into_a_users_folder_deletes_nothing_and_never_follows_links(
    s3_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kohya_backend.cli import main

    bucket = new_bucket(s3_env)
    raw_client(s3_env).put_object(Bucket=bucket, Key="datasets/cats/10_cat/a.png", Body=b"A" * 100)
    mine = tmp_path / "Pictures"
    (mine / "holiday").mkdir(parents=True)
    (mine / "holiday" / "beach.jpg").write_bytes(b"mine")
    (mine / ".config").write_text("hidden")
    # `s3 download s3://.../ DIR` is `aws s3 sync` without --delete: the folder's own files stay.
    assert main(["s3", "download", f"s3://{bucket}/datasets/cats/", str(mine)]) == 0, capsys.readouterr().err
    assert (mine / "10_cat" / "a.png").read_bytes() == b"A" * 100
    assert (mine / "holiday" / "beach.jpg").read_bytes() == b"mine" and (mine / ".config").is_file()
    # delete=True (a job's own folder) removes what the prefix lacks, but a link is removed, not followed.
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "precious.txt").write_text("keep")
    (outside / "sub" / "deep.txt").write_text("keep")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "link.txt").symlink_to(outside / "precious.txt")
    (staged / "linked-dir").symlink_to(outside / "sub", target_is_directory=True)
    (staged / ".kept").write_text("hidden files are not the sync's")
    stats = sync_prefix(
        S3Client(), S3Cache(tmp_path / "cache"), S3Uri(bucket, "datasets/cats/"), staged, delete=True
    )
    assert sorted(stats.removed) == ["link.txt", "linked-dir"]
    assert not (staged / "link.txt").is_symlink() and not (staged / "linked-dir").is_symlink()
    assert (outside / "precious.txt").read_text() == "keep" and (outside / "sub" / "deep.txt").is_file()
    assert (staged / ".kept").is_file() and (staged / "10_cat" / "a.png").is_file()


def test_a_job_input_whose_key_is_no_file_name_is_refused_before_any_download(
    s3_env: str, tmp_path: Path
) -> None:
    from kohya_backend.jobs.s3_jobs import stage_inputs
    from kohya_backend.storage.settings import S3Access

    bucket = new_bucket(s3_env)
    raw = raw_client(s3_env)
    for key in ("models/..", "models/..\\..\\..\\evil.safetensors"):  # S3 takes both as keys
        raw.put_object(Bucket=bucket, Key=key, Body=b"weights")
        job = tmp_path / key.replace("\\", "_").replace("/", "_") / "job"
        access = S3Access(tmp_path / "cache")
        with pytest.raises(UnsafeKey) as caught:
            stage_inputs({"network_weights": f"s3://{bucket}/{key}"}, job / "s3-inputs", access)
        assert f"s3://{bucket}/{key}" in caught.value.message
        assert not job.exists() and not list((tmp_path / "cache").rglob("blobs/*/*"))  # nothing fetched


def test_upload_folder_skips_hidden_files_and_what_is_already_there(s3_env: str, tmp_path: Path) -> None:
    bucket = new_bucket(s3_env)
    folder = tmp_path / "ds"
    (folder / "10_cat").mkdir(parents=True)
    (folder / "10_cat" / "a.png").write_bytes(b"P" * 500)
    (folder / "10_cat" / "a.txt").write_text("cat")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("no")
    client = S3Client()
    from kohya_backend.models.hashing import sha256_file

    uri = S3Uri(bucket, "datasets/ds/")
    first = upload_folder(client, folder, uri, sha256=sha256_file)
    assert first.files == 2 and first.transferred == 503
    keys = sorted(i.uri.key for i in client.list_objects(uri))
    assert keys == ["datasets/ds/10_cat/a.png", "datasets/ds/10_cat/a.txt"]
    (folder / "10_cat" / "a.txt").write_text("a cat")
    second = upload_folder(client, folder, uri, sha256=sha256_file)
    assert second.transferred == 5 and second.unchanged == 1
