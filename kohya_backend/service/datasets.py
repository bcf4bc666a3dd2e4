"""Dataset management shared by the REST API, the tab and the CLI: create from uploads or zips, list images with
captions, edit captions, validate with the trainer's scan, delete; every name stays inside the home's datasets/.

A new dataset is assembled in a hidden staging folder and renamed into place only when it holds usable images, so
a bad upload leaves nothing behind and never touches an existing dataset.
"""

from __future__ import annotations

import builtins
import functools
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import tomlkit
from tomlkit.exceptions import ParseError

from kohya_backend.data.archive import ArchiveError, ArchiveLimits, copy_file, extract_zip, member_path
from kohya_backend.data.images import IMAGE_EXTENSIONS, BadImageError, is_image_file, probe_image
from kohya_backend.data.preprocess import Preprocess, preprocess_image
from kohya_backend.data.scan import SUBSET_FOLDER, DatasetListing, check_caption_extension, list_dataset
from kohya_backend.errors import ConfigError, DatasetError, InUse, TrainManagementError
from kohya_backend.fileio import atomic_write
from kohya_backend.jobs.states import JobStatus
from kohya_backend.jobs.store import Job, JobStore
from kohya_backend.names import windows_name_problem
from kohya_backend.service.home import DEFAULT_CAPTION_EXTENSION, Home, NotInHome
from kohya_backend.service.tasks import Task, TaskRunner

CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption", ".tags")
MAX_NAME_LENGTH = 100
MAX_REPEATS = 10_000
_UNSAFE_NAME = re.compile(r'[\x00-\x1f/\\<>:"|?*]')

STAGING_PREFIX = ".incoming-"  # uploads wait here (hidden: listings skip dot folders) until unpacked
STALE_STAGING_S = 3600.0  # a staging folder untouched this long belongs to a killed process
STAGING_TOUCH_S = 300.0  # how often a staging folder in use is touched (well under STALE_STAGING_S)


class DatasetExists(TrainManagementError):
    """A dataset of that name already exists (creating never merges into or replaces one)."""

    http_status = 409


class DatasetInUse(InUse):
    """Queued or running jobs train on the dataset, so it may not change under them; `job_ids` lists them (an
    HTTP answer's `detail.jobs`, as for the other in-use refusals)."""


@dataclass(frozen=True)
class IncomingFile:
    """One uploaded file: the name the client gave (a relative path for folder uploads) and its bytes.

    `owned`: the source is the service's own copy in a staging folder (start_create), which create() moves into
    the dataset instead of copying it, so the bytes of an upload are written once.
    """

    name: str
    source: Path | BinaryIO
    owned: bool = False


@dataclass
class _Staged:
    """Files received into the staging folder: (path in the upload, file on disk), and what was left out."""

    files: list[tuple[PurePosixPath, Path]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"file": name, "reason": reason})


def check_name(value: object, what: str) -> str:
    """A dataset or subject name that is safe as one folder name; TrainManagementError saying why otherwise."""
    text = str(value if value is not None else "").strip()
    if not text:
        raise TrainManagementError(f"{what} is empty", "give a name, e.g. 'my_subject'")
    if len(text) > MAX_NAME_LENGTH:
        raise TrainManagementError(f"{what} is {len(text)} characters long", f"use at most {MAX_NAME_LENGTH}")
    if text.startswith(".") or text.endswith(".") or _UNSAFE_NAME.search(text):
        raise TrainManagementError(
            f"{what} {text!r} is not a safe folder name",
            "use letters, digits, spaces, '-', '_' and '.' (not first or last); no / \\ < > : \" | ? *",
        )
    problem = windows_name_problem(text)
    if problem:
        raise TrainManagementError(
            f"{what} {text!r} is not a safe folder name: it {problem}", "choose another name"
        )
    return text


def parse_repeats(value: object) -> int:
    """The repeats of a `<repeats>_<name>` folder: a whole number from 1 to MAX_REPEATS (gradio sends floats)."""
    number: float | None
    try:
        number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        number = None
    if number is None or not number.is_integer() or not 1 <= number <= MAX_REPEATS:
        raise TrainManagementError(
            f"repeats {value!r} is not a whole number from 1 to {MAX_REPEATS}",
            "repeats says how often each image is seen per epoch, e.g. 10",
        )
    return int(number)


def _is_caption_file(path: PurePosixPath) -> bool:
    return path.suffix.lower() in CAPTION_EXTENSIONS


def _keep(path: PurePosixPath) -> str | None:
    """Why an uploaded file is not kept (None: it is an image or a caption)."""
    if is_image_file(Path(path.name)) or _is_caption_file(path):
        return None
    kinds = " ".join(IMAGE_EXTENSIONS + CAPTION_EXTENSIONS)
    return f"not an image or caption file ({kinds})"


def _layout_path(path: PurePosixPath, default_folder: str) -> PurePosixPath:
    """Where an uploaded file goes: from its first `<repeats>_<name>` folder on, else into `default_folder`."""
    for index, part in enumerate(path.parts[:-1]):
        if SUBSET_FOLDER.match(part):
            return PurePosixPath(*path.parts[index:])
    return PurePosixPath(default_folder, path.name)


def _place(incoming: IncomingFile, target: Path, limit: int, label: str) -> int:
    """Put an upload's bytes at `target` (a new file), refusing more than `limit` bytes; returns their count.

    The service's own staged copy is moved (a rename: same folder tree, nothing written again), unless it is still
    a hard link to the caller's file: the dataset then gets a copy of its own, as for every other source.
    """
    source = incoming.source
    if incoming.owned and isinstance(source, Path):
        info = source.lstat()
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            if info.st_size > limit:
                raise ArchiveError(
                    f"{label} holds {info.st_size:,} bytes, more than the limit of {limit:,} bytes",
                    "split the upload or leave out large files",
                )
            os.replace(source, target)
            return info.st_size
    return copy_file(source, target, limit, label)


def _hard_link(source: Path, target: Path) -> bool:
    """Link `target` to `source` (no copy on the same filesystem); False when the filesystem cannot."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


class _StagingInUse:
    """Touches a staging folder every STAGING_TOUCH_S until stop(), so the sweep of another process (or of a
    reloaded UI) sees it in use however long the work, or its wait in the task queue, takes."""

    def __init__(self, folder: Path) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._touch, args=(folder,), name="train-management-staging", daemon=True
        )
        self._thread.start()

    def _touch(self, folder: Path) -> None:
        while not self._stop.wait(STAGING_TOUCH_S):
            try:
                os.utime(folder)
            except OSError:  # removed meanwhile: nothing left to keep fresh
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def check_health_resolution(resolution: object) -> int:
    """The training resolution a health report is made for: a multiple of 64 from 256 to 2048."""
    if (
        isinstance(resolution, int)
        and not isinstance(resolution, bool)
        and 256 <= resolution <= 2048
        and resolution % 64 == 0
    ):
        return resolution
    raise TrainManagementError(
        f"resolution {resolution!r} is not a training resolution",
        "use a multiple of 64 from 256 to 2048, e.g. 512 (SD 1.5) or 1024 (SDXL)",
    )


class DatasetService:
    """Creates, shows, validates, edits and deletes kohya-style datasets under `home.datasets`.

    With `jobs`, a dataset that a queued or running job uses cannot be changed or deleted.
    """

    def __init__(
        self, home: Home, *, jobs: JobStore | None = None, limits: ArchiveLimits | None = None
    ) -> None:
        self.home = home
        self.jobs = jobs
        self.limits = limits or ArchiveLimits()
        self.tasks = TaskRunner()  # start_create and start_validate run here
        self._remove_stale_staging()

    def _remove_stale_staging(self) -> None:
        """Remove staging folders (.incoming-*) untouched for STALE_STAGING_S: a killed process left them (one in
        use is kept fresh by _StagingInUse). Another process may remove one at the same time."""
        cutoff = time.time() - STALE_STAGING_S
        for folder in self.home.datasets.glob(f"{STAGING_PREFIX}*"):
            try:
                stale = folder.is_dir() and not folder.is_symlink() and folder.stat().st_mtime < cutoff
            except OSError:
                continue
            if stale:
                shutil.rmtree(folder, ignore_errors=True)

    # -- in the background (a UI event must not wait minutes) ------------------------------------------------

    def start_create(
        self,
        name: str,
        files: Sequence[IncomingFile],
        *,
        repeats: object = 10,
        subject: str | None = None,
        preprocess: Preprocess | None = None,
    ) -> str:
        """create() on a background thread; returns the ticket for task(). What can be checked at once is (name,
        repeats, subject, an existing dataset, the file count), and the files are copied into the home first:
        the caller's temporary files may be deleted as soon as it returns."""
        self._check_new(name, files, repeats, subject)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.home.datasets))
        in_use = _StagingInUse(staging)

        def cleanup() -> None:
            in_use.stop()
            shutil.rmtree(staging, ignore_errors=True)

        try:
            kept = self._keep_uploads(files, staging)
        except BaseException:
            cleanup()
            raise
        work = functools.partial(
            self.create, name, kept, repeats=repeats, subject=subject, preprocess=preprocess
        )
        return self.tasks.submit("dataset creation", work, cleanup=cleanup)

    def start_validate(self, name: str, caption_extension: str = DEFAULT_CAPTION_EXTENSION) -> str:
        """validate() with every image decoded, on a background thread; returns the ticket for task()."""
        self.folder(name)
        ext = check_caption_extension(caption_extension)
        return self.tasks.submit("dataset validation", functools.partial(self.validate, name, ext))

    def start_health(
        self, name: str, caption_extension: str = DEFAULT_CAPTION_EXTENSION, *, resolution: int = 512
    ) -> str:
        """health() on a background thread; returns the ticket for task()."""
        self.folder(name)
        ext = check_caption_extension(caption_extension)
        check_health_resolution(resolution)
        work = functools.partial(self.health, name, ext, resolution=resolution)
        return self.tasks.submit("dataset health report", work)

    def health(
        self, name: str, caption_extension: str = DEFAULT_CAPTION_EXTENSION, *, resolution: int = 512
    ) -> dict[str, Any]:
        """The health report of dataset `name` for training at `resolution` (data/health.py): duplicates, sizes,
        buckets, caption lengths, tags, missing captions, mismatched extensions."""
        from kohya_backend.data.health import dataset_health

        folder = self.folder(name)
        check_health_resolution(resolution)
        report = dataset_health(folder, check_caption_extension(caption_extension), resolution=resolution)
        return {"name": name, **report}

    def task(self, ticket: str) -> Task:
        """A background task of this service: running, done (its result) or failed (its error)."""
        return self.tasks.get(ticket)

    def _keep_uploads(self, files: Sequence[IncomingFile], dest: Path) -> builtins.list[IncomingFile]:
        """The uploads linked (same filesystem) or copied into `dest`, under the entry and size limits."""
        if len(files) > self.limits.max_entries:
            raise TrainManagementError(
                f"{len(files)} files were uploaded, more than the limit of {self.limits.max_entries}",
                "split the upload into several datasets",
            )
        budget, kept = self.limits.max_total_bytes, []
        for index, incoming in enumerate(files):
            target = dest / f"{index:06d}"
            if isinstance(incoming.source, Path) and _hard_link(incoming.source, target):
                budget -= target.stat().st_size
            else:
                budget -= copy_file(incoming.source, target, budget, f"upload {incoming.name}")
            if budget < 0:
                raise TrainManagementError(
                    f"the upload is larger than the limit of {self.limits.max_total_bytes} bytes",
                    "split the upload into several datasets",
                )
            kept.append(IncomingFile(incoming.name, target, owned=True))
        return kept

    # -- listing and reading ----------------------------------------------------------------------------------

    def list(self, caption_extension: str = DEFAULT_CAPTION_EXTENSION) -> list[dict[str, Any]]:
        """Dataset folders with a scan summary or the scan error (the same as GET /datasets)."""
        return self.home.list_datasets(check_caption_extension(caption_extension))

    def folder(self, name: str) -> Path:
        """The folder of dataset `name` (one folder name under datasets/); NotInHome when there is none."""
        check_name(name, "dataset name")
        return self.home.dataset_path(name)

    def show(self, name: str, caption_extension: str = DEFAULT_CAPTION_EXTENSION) -> dict[str, Any]:
        """The dataset's `<repeats>_<name>` folders, its images with their captions, and a quick validation report,
        all from one listing of the folder (images' headers read, not decoded)."""
        folder = self.folder(name)
        listing = list_dataset(folder, check_caption_extension(caption_extension), verify_images=False)
        counts = Counter(item.subset for item in listing.images)
        subsets = sorted(listing.folders, key=lambda s: s.name)
        return {
            "name": name,
            "folder": str(folder),
            "subsets": [
                {"name": s.name, "repeats": s.repeats, "class_token": s.class_token, "images": counts[s.name]}
                for s in subsets
            ],
            "images": [
                {"image": i.path.relative_to(folder).as_posix(), "subset": i.subset, "caption": i.caption}
                for i in sorted(listing.images, key=lambda i: (i.subset, i.path.name))
            ],
            "report": self._report(folder, listing),
        }

    def validate(
        self, name: str, caption_extension: str = DEFAULT_CAPTION_EXTENSION, *, verify_images: bool = True
    ) -> dict[str, Any]:
        """The trainer's scan of the dataset: ok, or what is wrong and which files; warnings; counts."""
        folder = self.folder(name)
        listing = list_dataset(
            folder, check_caption_extension(caption_extension), verify_images=verify_images
        )
        return self._report(folder, listing)

    def _report(self, folder: Path, listing: DatasetListing) -> dict[str, Any]:
        """A listing as the validation report (paths relative to the datasets folder, files to the dataset)."""
        root = f"{self.home.datasets}{os.sep}"
        report: dict[str, Any] = {"ok": True, "message": None, "hint": None, "files": [], "warnings": []}
        try:
            scan = listing.scan()
        except (DatasetError, ConfigError) as exc:
            files = [str(f) for f in getattr(exc, "files", [])]
            report.update(
                ok=False,
                message=exc.message.replace(root, ""),
                hint=exc.hint,
                files=[f[len(str(folder)) + 1 :] if f.startswith(f"{folder}{os.sep}") else f for f in files],
            )
            return report
        report.update(
            warnings=[w.replace(root, "") for w in scan.warnings],
            images=scan.num_images,
            train_items=scan.num_train_items,
            subsets=scan.dataset_dirs_info(),
        )
        return report

    def image_path(self, name: str, image: str) -> Path:
        """The image file `image` (relative to the dataset folder); NotInHome when it is not one of its images."""
        folder = self.folder(name)
        path = self.home.resolve(image, [folder], what="image")
        if not is_image_file(path) or not path.is_file():
            raise NotInHome(
                f"image {image!r} does not exist in dataset {name!r}",
                "name an image relative to the dataset folder, e.g. '10_subject/001.png'",
            )
        return path

    def read_caption(self, name: str, image: str, caption_extension: str = DEFAULT_CAPTION_EXTENSION) -> str:
        """The whole caption file of an image ('' when it has none)."""
        path = self.image_path(name, image)
        caption = path.with_name(path.stem + check_caption_extension(caption_extension))
        try:
            return caption.read_text(encoding="utf-8-sig", errors="replace").rstrip("\r\n")
        except FileNotFoundError:
            return ""

    # -- changing ---------------------------------------------------------------------------------------------

    def _check_not_in_use(self, name: str) -> None:
        """Refuse while a queued or running job reads this dataset's folder, however the job named it (another
        spelling, a symlink to it, its reg_data_dir, a folder inside it or around it)."""
        if self.jobs is None:
            return
        folder = Path(os.path.realpath(self.folder(name)))
        users = [job.id for job in self.jobs.iter_jobs(status=JobStatus.busy()) if self._reads(job, folder)]
        if users:
            raise DatasetInUse(
                f"dataset {name!r} is used by job(s) {', '.join(users)} that are queued or training",
                "wait until they finish, or cancel them first",
                users,
            )

    def _reads(self, job: Job, folder: Path) -> bool:
        """Whether `job` reads images from `folder` (or a folder inside or around it), symlinks resolved."""
        used = [self.home.datasets / job.dataset]
        reg = None
        if "reg_data_dir" in job.config_toml:  # parsing every busy job's TOML would be slow for nothing
            try:
                reg = tomlkit.parse(job.config_toml).get("reg_data_dir")
            except ParseError:
                reg = None
        if isinstance(reg, str) and reg:
            used.append(self.home.datasets / reg)  # an absolute path stays itself
        for path in used:
            real = Path(os.path.realpath(path))
            if real == folder or folder in real.parents or real in folder.parents:
                return True
        return False

    def write_caption(
        self, name: str, image: str, text: str, caption_extension: str = DEFAULT_CAPTION_EXTENSION
    ) -> dict[str, Any]:
        """Replace an image's caption file (written atomically); an empty text leaves an empty caption."""
        path = self.image_path(name, image)
        self._check_not_in_use(name)
        caption = path.with_name(path.stem + check_caption_extension(caption_extension))
        body = str(text).replace("\r\n", "\n").strip()
        atomic_write(caption, body + "\n" if body else "")
        return {"image": image, "caption": body}

    def delete_image(self, name: str, image: str) -> None:
        """Delete one image and its caption files."""
        path = self.image_path(name, image)
        self._check_not_in_use(name)
        for ext in CAPTION_EXTENSIONS:
            path.with_name(path.stem + ext).unlink(missing_ok=True)
        path.unlink()

    def delete(self, name: str) -> None:
        """Delete a dataset folder with everything in it (a symlinked dataset: only the link)."""
        folder = self.folder(name)
        self._check_not_in_use(name)
        link = self.home.datasets / name
        if link.is_symlink():
            link.unlink()
            return
        shutil.rmtree(folder)

    # -- creating ---------------------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        files: Sequence[IncomingFile],
        *,
        repeats: object = 10,
        subject: str | None = None,
        preprocess: Preprocess | None = None,
    ) -> dict[str, Any]:
        """Create dataset `name` from uploaded images, captions and zips.

        Files inside a `<repeats>_<name>` folder (in a zip or a folder upload) keep their place; the rest go into
        `<repeats>_<subject>/` (subject defaults to the dataset name; the answer's `subset_folder` names it). Only
        images and captions are kept; broken images are left out; everything left out is listed with the reason.
        """
        name, folder_name = self._check_new(name, files, repeats, subject)
        target = self.home.datasets / name
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.home.datasets))
        in_use = _StagingInUse(staging)
        try:
            staged = self._receive(files, staging / "upload")
            added = self._arrange(staged, staging / "dataset", folder_name)
            added = self._check_images(staging / "dataset", added, preprocess, staged)
            if not added:
                raise DatasetError(
                    "the upload holds no usable image: "
                    + (
                        "; ".join(f"{s['file']}: {s['reason']}" for s in staged.skipped[:10]) or "it is empty"
                    ),
                    "upload .png/.jpg/.jpeg/.webp/.bmp images (with .txt captions of the same name)",
                    files=[s["file"] for s in staged.skipped],
                )
            if target.exists():
                raise DatasetExists(f"dataset {name!r} was created meanwhile", "choose another name")
            os.rename(staging / "dataset", target)
        finally:
            in_use.stop()
            shutil.rmtree(staging, ignore_errors=True)
        return {
            "name": name,
            "folder": str(target),
            "subset_folder": folder_name,
            "images": [p.as_posix() for p in added],
            "skipped": staged.skipped,
            "preprocess": preprocess.label() if preprocess else None,
            "report": self.validate(name, verify_images=False),
        }

    def _check_new(
        self, name: str, files: Sequence[IncomingFile], repeats: object, subject: str | None
    ) -> tuple[str, str]:
        """The checks before creating dataset `name`; returns the name and its `<repeats>_<subject>` folder."""
        name = check_name(name, "dataset name")
        folder_name = f"{parse_repeats(repeats)}_{check_name(subject or name, 'subject (class token)')}"
        target = self.home.datasets / name
        if target.exists() or target.is_symlink():
            raise DatasetExists(
                f"dataset {name!r} already exists",
                "choose another name, or delete the existing dataset first",
            )
        if not files:
            raise TrainManagementError(
                "no files were uploaded", "add images (and captions), or a zip of them"
            )
        return name, folder_name

    def import_folder(
        self,
        source: Path,
        name: str,
        *,
        repeats: object = 10,
        subject: str | None = None,
        preprocess: Preprocess | None = None,
    ) -> dict[str, Any]:
        """Copy a local folder in as dataset `name`, keeping its relative paths (the CLI only: any local path)."""
        source = Path(source).expanduser()
        if not source.is_dir():
            raise TrainManagementError(f"{source} is not a folder", "name the folder that holds the images")
        files, links = [], []
        for root, dirs, names in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file_name in sorted(names):
                path = Path(root) / file_name
                if path.is_symlink():
                    links.append(path.relative_to(source).as_posix())
                    continue
                files.append(IncomingFile(path.relative_to(source).as_posix(), path))
        result = self.create(name, files, repeats=repeats, subject=subject, preprocess=preprocess)
        result["skipped"] += [{"file": link, "reason": "symbolic link (not followed)"} for link in links]
        return result

    def _receive(self, files: Sequence[IncomingFile], dest: Path) -> _Staged:
        """Copy (or, the service's own staged copies, move) plain uploads and unpack zips into `dest`, within the
        entry and size limits."""
        staged = _Staged()
        dest.mkdir()
        budget = self.limits.max_total_bytes
        if len(files) > self.limits.max_entries:
            raise TrainManagementError(
                f"{len(files)} files were uploaded, more than the limit of {self.limits.max_entries}",
                "split the upload into several datasets",
            )
        for index, incoming in enumerate(files):
            rel = member_path(incoming.name)
            if rel.suffix.lower() == ".zip":
                unpack = dest / f"zip-{index}"
                unpack.mkdir()
                limits = ArchiveLimits(
                    max_entries=self.limits.max_entries,
                    max_total_bytes=budget,
                    max_entry_bytes=self.limits.max_entry_bytes,
                    max_ratio=self.limits.max_ratio,
                )
                archive = incoming.source
                if not isinstance(archive, Path):
                    # A file on disk, not the upload's stream: zipfile needs a seekable file, and Python 3.10's
                    # SpooledTemporaryFile (what the WebUI's starlette hands over) lacks seekable().
                    archive = dest / f"upload-{index}.zip"
                    copy_file(incoming.source, archive, self.limits.max_total_bytes, f"upload {rel}")
                out = extract_zip(archive, unpack, keep=_keep, limits=limits, label=rel.as_posix())
                for path in out.files:
                    staged.files.append((path, unpack.joinpath(*path.parts)))
                    budget -= unpack.joinpath(*path.parts).stat().st_size
                staged.skipped += [{"file": f"{rel}/{n}", "reason": why} for n, why in out.skipped]
                continue
            reason = "hidden file" if any(p.startswith(".") for p in rel.parts) else _keep(rel)
            target = dest / "files" / rel
            if reason is None and target.exists():
                reason = "another file has the same name"
            if reason is not None:
                staged.skip(rel.as_posix(), reason)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            budget -= _place(incoming, target, min(self.limits.max_entry_bytes, budget), f"upload {rel}")
            staged.files.append((rel, target))
        return staged

    @staticmethod
    def _arrange(staged: _Staged, dest: Path, folder_name: str) -> builtins.list[PurePosixPath]:
        """Move the received files into the kohya layout under `dest`; returns the images placed."""
        images = []
        for original, path in staged.files:
            rel = _layout_path(original, folder_name)
            target = dest.joinpath(*rel.parts)
            if target.exists():
                staged.skip(original.as_posix(), f"another file is already placed at {rel}")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            if is_image_file(target):
                images.append(rel)
        return images

    @staticmethod
    def _check_images(
        root: Path, images: builtins.list[PurePosixPath], preprocess: Preprocess | None, staged: _Staged
    ) -> builtins.list[PurePosixPath]:
        """Decode (and optionally preprocess) every image; broken ones are removed with their captions."""
        kept = []
        for rel in images:
            path = root.joinpath(*rel.parts)
            reason = None
            try:
                if path.stat().st_size == 0:
                    reason = "the file is empty (if it was still uploading, wait until it is done and retry)"
                elif preprocess is not None:
                    preprocess_image(path, preprocess)
                else:
                    probe_image(path, full_decode=True)
            except BadImageError as exc:
                reason = exc.reason
            if reason is None:
                kept.append(rel)
                continue
            staged.skip(rel.as_posix(), reason)
            for ext in CAPTION_EXTENSIONS:
                path.with_name(path.stem + ext).unlink(missing_ok=True)
            path.unlink()
        return kept
