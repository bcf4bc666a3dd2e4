"""Safe unpacking of uploaded zip archives (and of tar archives such as SageMaker's model.tar.gz) and safe relative
names for uploaded files.

Nothing a client names may leave the destination: absolute paths, drive letters, '..' and symlink entries are
refused, and entry count, total size, per-entry size and compression ratio are limited (zip bombs), counting the
bytes actually written rather than trusting the archive's headers.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from kohya_backend.errors import TrainManagementError
from kohya_backend.names import windows_name_problem

_CHUNK = 1024 * 1024
# Below this size a high compression ratio is normal (a caption of repeated tags), so the ratio is not checked.
_RATIO_MIN_BYTES = 1024 * 1024
_FORBIDDEN_CHARACTERS = set('<>:"|?*')


class ArchiveError(TrainManagementError):
    """An upload or archive is unsafe (traversal, symlink, bomb) or unreadable; nothing of it is kept."""


@dataclass(frozen=True)
class ArchiveLimits:
    """How much an upload may hold: entries, bytes in all, bytes per file, and uncompressed/compressed ratio."""

    max_entries: int = 20_000
    max_total_bytes: int = 8 * 1024**3
    max_entry_bytes: int = 512 * 1024**2
    max_ratio: float = 200.0


@dataclass
class Extracted:
    """What an archive gave: the relative paths written, and (name, reason) for every entry not kept."""

    files: list[PurePosixPath] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _size_text(count: int) -> str:
    if count >= 1024**3:
        return f"{count / 1024**3:.1f} GiB"
    return f"{count / 1024**2:.1f} MiB" if count >= 1024**2 else f"{count} bytes"


def member_path(name: str, *, what: str = "file name") -> PurePosixPath:
    """A client's relative name ('a/b.png', backslashes allowed) as a safe relative path; ArchiveError otherwise."""
    text = name.replace("\\", "/")
    if not text.strip("/ ") or "\x00" in text or any(ord(c) < 32 for c in text):
        raise ArchiveError(f"{what} {name!r} is empty or holds control characters", "rename the file")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise ArchiveError(
            f"{what} {name!r} is an absolute path",
            "upload files with relative names (pack a folder, not a path)",
        )
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(
            f"{what} {name!r} contains '..'", "an upload may not name files outside its folder"
        )
    bad = sorted({c for p in parts for c in p if c in _FORBIDDEN_CHARACTERS})
    if bad:
        raise ArchiveError(
            f"{what} {name!r} contains characters file names may not hold: {' '.join(bad)}", "rename the file"
        )
    for part in parts:  # what else Windows refuses: device names (CON, AUX.png), a trailing dot or space
        problem = windows_name_problem(part)
        if problem:
            raise ArchiveError(f"{what} {name!r}: {part!r} {problem}", "rename it")
    return PurePosixPath(*parts)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_entries(
    infos: list[zipfile.ZipInfo], archive_bytes: int, limits: ArchiveLimits, label: str
) -> None:
    """Refuse the whole archive before anything is written when its headers already break a limit."""
    if len(infos) > limits.max_entries:
        raise ArchiveError(
            f"{label} has {len(infos)} entries, more than the limit of {limits.max_entries}",
            "split it into several archives or datasets",
        )
    total = 0
    for info in infos:
        member_path(info.filename, what=f"{label}: entry")
        if _is_symlink(info):
            raise ArchiveError(
                f"{label}: entry {info.filename!r} is a symbolic link", "pack the files themselves, not links"
            )
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{label}: entry {info.filename!r} is encrypted", "pack it without a password")
        if info.file_size > limits.max_entry_bytes:
            raise ArchiveError(
                f"{label}: entry {info.filename!r} unpacks to {_size_text(info.file_size)}, more than the "
                f"limit of {_size_text(limits.max_entry_bytes)} per file",
                "downscale or leave out the file",
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_MIN_BYTES and ratio > limits.max_ratio:
            raise ArchiveError(
                f"{label}: entry {info.filename!r} expands {ratio:.0f} times (limit {limits.max_ratio:.0f}): "
                "refused as a possible zip bomb",
                "images barely compress; pack the dataset's images and captions as they are",
            )
        total += info.file_size
    if total > limits.max_total_bytes:
        raise ArchiveError(
            f"{label} unpacks to {_size_text(total)}, more than the limit of {_size_text(limits.max_total_bytes)}",
            "split it into several archives or datasets",
        )
    if total > _RATIO_MIN_BYTES and total / max(archive_bytes, 1) > limits.max_ratio:
        raise ArchiveError(
            f"{label} expands {total / max(archive_bytes, 1):.0f} times (limit {limits.max_ratio:.0f}): "
            "refused as a possible zip bomb",
            "pack the dataset's images and captions as they are",
        )


def _skip_reason(path: PurePosixPath) -> str | None:
    """Entries every archive tool adds that are never dataset files (macOS resource forks, hidden files)."""
    if path.parts[0] == "__MACOSX":
        return "macOS metadata"
    if any(part.startswith(".") for part in path.parts):
        return "hidden file"
    return None


def _archive_size(source: Path | BinaryIO) -> int:
    if isinstance(source, Path):
        return source.stat().st_size
    position = source.tell()
    size = source.seek(0, 2)
    source.seek(position)
    return size


def copy_limited(reader: IO[bytes] | BinaryIO, dest: Path, limit: int, label: str) -> int:
    """Copy a stream into a new file, refusing (and removing it) once more than `limit` bytes arrive."""
    written = 0
    with open(dest, "xb") as out:
        while chunk := reader.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                out.close()
                dest.unlink()
                raise ArchiveError(
                    f"{label} holds more than {_size_text(limit)}",
                    "split the upload or leave out large files",
                )
            out.write(chunk)
    return written


def extract_zip(
    source: Path | BinaryIO,
    dest: Path,
    *,
    keep: Callable[[PurePosixPath], str | None],
    limits: ArchiveLimits | None = None,
    label: str = "the archive",
) -> Extracted:
    """Unpack a zip into `dest` (which must exist); `keep(path)` returns None to keep an entry or why it is skipped.

    Raises ArchiveError for an unsafe or damaged archive; the caller unpacks into a staging folder and removes it.
    """
    limits = limits or ArchiveLimits()
    out = Extracted()
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{label} is not a readable zip archive ({exc})", "upload a .zip file") from exc
    with archive:
        infos = archive.infolist()
        _check_entries(infos, _archive_size(source), limits, label)
        budget = limits.max_total_bytes
        for info in infos:
            path = member_path(info.filename, what=f"{label}: entry")
            if info.is_dir():
                continue
            reason = _skip_reason(path) or keep(path)
            target = dest.joinpath(*path.parts)
            if reason is None and target.exists():
                reason = "another entry has the same name"
            if reason is not None:
                out.skipped.append((path.as_posix(), reason))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as reader:
                    budget -= copy_limited(reader, target, min(info.file_size, budget), f"{label}: {path}")
            except (zipfile.BadZipFile, EOFError, ValueError) as exc:
                raise ArchiveError(
                    f"{label}: entry {info.filename!r} is damaged ({exc})", "pack the archive again"
                ) from exc
            out.files.append(path)
    return out


def copy_file(source: Path | BinaryIO, dest: Path, limit: int, label: str) -> int:
    """Copy an uploaded file (a path or an open stream) into a new file of at most `limit` bytes."""
    if isinstance(source, Path):
        with open(source, "rb") as reader:
            return copy_limited(reader, dest, limit, label)
    if hasattr(source, "seek"):
        source.seek(0)
    return copy_limited(source, dest, limit, label)


def _check_tar_members(members: list[tarfile.TarInfo], limits: ArchiveLimits, label: str) -> None:
    """Refuse the whole tar before anything is written: links, devices, unsafe names, too many or too big."""
    if len(members) > limits.max_entries:
        raise ArchiveError(
            f"{label} has {len(members)} entries, more than the limit of {limits.max_entries}",
            "pack fewer files",
        )
    total = 0
    for member in members:
        member_path(member.name, what=f"{label}: entry")
        if not (member.isfile() or member.isdir()):
            kind = "a link" if member.issym() or member.islnk() else "not a regular file"
            raise ArchiveError(
                f"{label}: entry {member.name!r} is {kind}", "pack the files themselves, not links or devices"
            )
        if member.size > limits.max_entry_bytes:
            raise ArchiveError(
                f"{label}: entry {member.name!r} unpacks to {_size_text(member.size)}, more than the limit of "
                f"{_size_text(limits.max_entry_bytes)} per file",
                "leave out the file",
            )
        total += member.size
    if total > limits.max_total_bytes:
        raise ArchiveError(
            f"{label} unpacks to {_size_text(total)}, more than the limit of {_size_text(limits.max_total_bytes)}",
            "pack fewer or smaller files",
        )


def extract_tar(
    source: Path,
    dest: Path,
    *,
    limits: ArchiveLimits | None = None,
    label: str = "the archive",
) -> Extracted:
    """Unpack a tar (plain or gzip) into `dest` (which must exist) under the zip rules: every name checked with
    member_path, no links or devices, entry count, per-file and total size capped on the bytes actually written.
    Hidden files and macOS metadata are skipped; raises ArchiveError (the caller unpacks into a staging folder)."""
    limits = limits or ArchiveLimits()
    out = Extracted()
    try:
        archive = tarfile.open(source, mode="r:*")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"{label} is not a readable tar archive ({exc})", "create it with tar") from exc
    with archive:
        try:
            members = archive.getmembers()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise ArchiveError(f"{label} is damaged ({exc})", "create it again") from exc
        _check_tar_members(members, limits, label)
        budget = limits.max_total_bytes
        for member in members:
            path = member_path(member.name, what=f"{label}: entry")
            if member.isdir():
                continue
            reason = _skip_reason(path)
            target = dest.joinpath(*path.parts)
            if reason is None and target.exists():
                reason = "another entry has the same name"
            if reason is None:
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):
                    reason = "another entry is a file where this one needs a folder"
            if reason is not None:
                out.skipped.append((path.as_posix(), reason))
                continue
            reader = archive.extractfile(member)
            if reader is None:
                continue
            try:
                with reader:
                    budget -= copy_limited(reader, target, min(member.size, budget), f"{label}: {path}")
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise ArchiveError(
                    f"{label}: entry {member.name!r} is damaged ({exc})", "create it again"
                ) from exc
            out.files.append(path)
    return out
