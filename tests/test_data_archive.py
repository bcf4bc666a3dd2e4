"""Safe unpacking of uploaded zips: traversal, absolute names, symlinks, bombs, entry counts, damaged data."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from kohya_backend.data.archive import (
    ArchiveError,
    ArchiveLimits,
    copy_file,
    extract_tar,
    extract_zip,
    member_path,
)


def _zip(entries: dict[str, bytes], *, compression: int = zipfile.ZIP_STORED) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    buffer.seek(0)
    return buffer


def _keep_png(path: PurePosixPath) -> str | None:
    return None if path.suffix in (".png", ".txt") else "not an image or caption"


def test_member_path_keeps_relative_folders_and_normalises_separators() -> None:
    assert member_path("10_cat/a.png") == PurePosixPath("10_cat/a.png")
    assert member_path("set\\10_cat\\./a.png") == PurePosixPath("set/10_cat/a.png")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../evil.png", "'..'"),
        ("a/../../evil.png", "'..'"),
        ("/etc/passwd", "absolute"),
        ("C:\\Windows\\x.png", "absolute"),
        ("", "empty"),
        ("a\x00b.png", "control"),
        ("a|b.png", "characters"),
    ],
)
def test_member_path_refuses_names_that_could_escape(name: str, why: str) -> None:
    with pytest.raises(ArchiveError, match=why):
        member_path(name)


def test_extracts_kept_files_and_reports_the_rest(tmp_path: Path) -> None:
    source = _zip(
        {
            "ds/10_cat/a.png": b"png-a",
            "ds/10_cat/a.txt": b"a cat",
            "ds/readme.md": b"hello",
            "__MACOSX/ds/._a.png": b"fork",
            "ds/10_cat/.DS_Store": b"x",
        }
    )
    out = extract_zip(source, tmp_path, keep=_keep_png)
    assert out.files == [PurePosixPath("ds/10_cat/a.png"), PurePosixPath("ds/10_cat/a.txt")]
    assert (tmp_path / "ds/10_cat/a.txt").read_bytes() == b"a cat"
    assert dict(out.skipped) == {
        "ds/readme.md": "not an image or caption",
        "__MACOSX/ds/._a.png": "macOS metadata",
        "ds/10_cat/.DS_Store": "hidden file",
    }
    assert not (tmp_path / "ds/readme.md").exists()


@pytest.mark.parametrize("name", ["../../evil.png", "/tmp/evil.png", "ok/../../evil.png"])
def test_traversal_entry_refuses_the_whole_archive_before_writing(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    source = _zip({"good.png": b"x", name: b"evil"})
    with pytest.raises(ArchiveError, match="entry"):
        extract_zip(source, dest, keep=_keep_png)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil.png").exists()


def test_symlink_entry_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("10_cat/link.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    buffer.seek(0)
    with pytest.raises(ArchiveError, match="symbolic link"):
        extract_zip(buffer, tmp_path, keep=_keep_png)
    assert list(tmp_path.iterdir()) == []


def test_zip_bomb_is_refused_by_its_ratio(tmp_path: Path) -> None:
    source = _zip({"10_cat/bomb.png": b"\0" * (8 * 1024 * 1024)}, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ArchiveError, match="zip bomb"):
        extract_zip(source, tmp_path, keep=_keep_png)
    assert list(tmp_path.iterdir()) == []


def test_total_size_entry_size_and_entry_count_limits(tmp_path: Path) -> None:
    entries = {f"10_cat/{i}.png": b"x" * 100 for i in range(5)}
    with pytest.raises(ArchiveError, match="5 entries, more than the limit of 4"):
        extract_zip(_zip(entries), tmp_path, keep=_keep_png, limits=ArchiveLimits(max_entries=4))
    with pytest.raises(ArchiveError, match="unpacks to 500 bytes, more than the limit of 499"):
        extract_zip(_zip(entries), tmp_path, keep=_keep_png, limits=ArchiveLimits(max_total_bytes=499))
    with pytest.raises(ArchiveError, match="per file"):
        extract_zip(_zip(entries), tmp_path, keep=_keep_png, limits=ArchiveLimits(max_entry_bytes=99))
    assert list(tmp_path.iterdir()) == []


def test_a_header_that_lies_about_its_size_does_not_write_more(tmp_path: Path) -> None:
    data = _zip({"10_cat/a.png": b"y" * 5000}).getvalue()
    # Patch both size fields (local header and central directory) to claim 10 bytes.
    forged = data.replace(
        (5000).to_bytes(4, "little") * 2, (5000).to_bytes(4, "little") + (10).to_bytes(4, "little")
    )
    assert forged != data
    with pytest.raises(ArchiveError):
        extract_zip(io.BytesIO(forged), tmp_path, keep=_keep_png)
    written = tmp_path / "10_cat/a.png"
    assert not written.exists() or written.stat().st_size <= 10


def test_not_a_zip_and_damaged_entries(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a readable zip"):
        extract_zip(io.BytesIO(b"this is text"), tmp_path, keep=_keep_png)
    data = bytearray(_zip({"10_cat/a.png": b"z" * 4000}).getvalue())
    data[60:70] = b"#" * 10  # inside the stored file data: its CRC no longer matches
    with pytest.raises(ArchiveError, match="damaged"):
        extract_zip(io.BytesIO(bytes(data)), tmp_path, keep=_keep_png)


def test_duplicate_entries_keep_the_first(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", b"first")
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("a.png", b"second")
    buffer.seek(0)
    out = extract_zip(buffer, tmp_path, keep=_keep_png)
    assert (tmp_path / "a.png").read_bytes() == b"first"
    assert out.skipped == [("a.png", "another entry has the same name")]


def test_copy_file_limits_plain_uploads(tmp_path: Path) -> None:
    assert copy_file(io.BytesIO(b"12345"), tmp_path / "ok.png", 5, "upload") == 5
    with pytest.raises(ArchiveError, match="more than 4 bytes"):
        copy_file(io.BytesIO(b"12345"), tmp_path / "big.png", 4, "upload")
    assert not (tmp_path / "big.png").exists()


# -- tar archives (SageMaker's model.tar.gz) ------------------------------------------------------------------


def _tar(path: Path, entries: list[tuple[str, bytes | None, str]]) -> Path:
    """A .tar.gz of (name, data, kind) with kind file / dir / symlink / hardlink / fifo (data: the link target)."""
    import tarfile

    with tarfile.open(path, "w:gz") as archive:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data or b"")
                archive.addfile(info, io.BytesIO(data or b""))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            info.linkname = (data or b"").decode()
            archive.addfile(info)
    return path


def test_tar_extracts_files_and_folders_and_skips_hidden_ones(tmp_path: Path) -> None:
    source = _tar(
        tmp_path / "model.tar.gz",
        [
            ("sample", None, "dir"),
            ("lora.safetensors", b"weights", "file"),
            ("./sample/a.png", b"png", "file"),
            (".hidden", b"x", "file"),
        ],
    )
    dest = tmp_path / "out"
    dest.mkdir()
    out = extract_tar(source, dest)
    assert sorted(p.as_posix() for p in out.files) == ["lora.safetensors", "sample/a.png"]
    assert out.skipped == [(".hidden", "hidden file")]
    assert (dest / "sample" / "a.png").read_bytes() == b"png"


def test_tar_skips_an_entry_below_another_entrys_file(tmp_path: Path) -> None:
    source = _tar(
        tmp_path / "clash.tar.gz",
        [("a", b"file a", "file"), ("a/b.png", b"png", "file"), ("a/c/d.png", b"png", "file")],
    )
    dest = tmp_path / "out"
    dest.mkdir()
    out = extract_tar(source, dest)  # an ArchiveError-free skip, not a FileExistsError
    assert [p.as_posix() for p in out.files] == ["a"] and (dest / "a").read_bytes() == b"file a"
    assert [name for name, _ in out.skipped] == ["a/b.png", "a/c/d.png"]


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (("../escape.txt", b"x", "file"), "'..'"),
        (("/etc/passwd", b"x", "file"), "absolute"),
        (("link", b"/etc/passwd", "symlink"), "a link"),
        (("hard", b"lora.safetensors", "hardlink"), "a link"),
        (("pipe", None, "fifo"), "not a regular file"),
    ],
)
def test_tar_refuses_escaping_names_links_and_devices_before_writing(
    tmp_path: Path, entry: tuple[str, bytes | None, str], words: str
) -> None:
    source = _tar(tmp_path / "bad.tar.gz", [("lora.safetensors", b"weights", "file"), entry])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArchiveError) as caught:
        extract_tar(source, dest)
    assert words in caught.value.message
    assert list(dest.iterdir()) == []  # refused whole: nothing was written


def test_tar_limits_entries_and_sizes(tmp_path: Path) -> None:
    source = _tar(tmp_path / "big.tar.gz", [("a.bin", b"x" * 100, "file"), ("b.bin", b"y" * 100, "file")])
    for limits, words in (
        (ArchiveLimits(max_entry_bytes=99), "per file"),
        (ArchiveLimits(max_total_bytes=150), "unpacks to"),
        (ArchiveLimits(max_entries=1), "2 entries"),
    ):
        dest = tmp_path / f"out-{words.replace(' ', '-')}"
        dest.mkdir()
        with pytest.raises(ArchiveError) as caught:
            extract_tar(source, dest, limits=limits)
        assert words in caught.value.message and list(dest.iterdir()) == []
    (tmp_path / "not.tar.gz").write_bytes(b"not a tar at all")
    with pytest.raises(ArchiveError, match="not a readable tar"):
        extract_tar(tmp_path / "not.tar.gz", tmp_path)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(ArchiveError, match=r"not a readable tar|damaged"):
        extract_tar(cut, tmp_path / "out-cut")
