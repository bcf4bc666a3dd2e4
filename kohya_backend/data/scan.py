"""Scan kohya-style `<repeats>_<name>` dataset folders: images, captions, repeats, and what is wrong with them."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kohya_backend.data.images import IMAGE_EXTENSIONS, BadImageError, is_image_file, probe_image
from kohya_backend.errors import ConfigError, ConfigIssue, DatasetError

if TYPE_CHECKING:
    from kohya_backend.data.dataset_config import DatasetParams, SubsetOptions

SUBSET_FOLDER = re.compile(r"^(\d+)_(.*)$")
# A dot, then a name that keeps `<basename><caption_extension>` in the image's folder: no slashes, no controls,
# none of Windows' reserved characters (":" reaches NTFS streams) and no trailing dot or space (Windows strips them).
_CAPTION_EXTENSION = re.compile(r'\.(?:[^/\\:*?"<>|\x00-\x1f]{0,30}[^/\\:*?"<>|.\s\x00-\x1f])')
# Caption extensions people commonly use; finding one of these next to uncaptioned images hints at a typo.
_KNOWN_CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")
_EXTENSIONS_TEXT = " ".join(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class ImageItem:
    """One training image: its file, its caption (None when it has no caption file) and its oriented size."""

    path: Path
    caption: str | None
    width: int
    height: int


@dataclass(frozen=True)
class ListedImage:
    """One image file of a `<repeats>_<name>` folder as listed: its folder, caption and why it is unusable."""

    path: Path
    subset: str
    caption: str | None
    problem: str | None = None


@dataclass
class Subset:
    """One `<repeats>_<name>` folder: `name` is the folder name, `class_token` the part after the repeats.

    A subset of a dataset_config also carries its dataset's index and its own options (None: the training
    config's settings apply).
    """

    path: Path
    name: str
    repeats: int
    class_token: str
    images: list[ImageItem]
    is_reg: bool
    dataset_index: int = 0
    options: SubsetOptions | None = None

    @property
    def num_items(self) -> int:
        """Images times repeats: how often this folder's images are seen per epoch (before reg balancing)."""
        return len(self.images) * self.repeats

    @property
    def uncaptioned(self) -> int:
        """How many images have no caption and are trained with the class token instead."""
        return sum(1 for item in self.images if item.caption is None)

    def caption_of(self, item: ImageItem) -> str:
        """The caption kohya trains this image with: its own, or the class token when it has none."""
        return item.caption if item.caption is not None else self.class_token


@dataclass
class DatasetScan:
    """Everything found under train_data_dir (and reg_data_dir): usable subsets, warnings, ignored paths."""

    subsets: list[Subset]
    warnings: list[str] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    datasets: list[DatasetParams] = field(
        default_factory=list
    )  # a dataset_config's datasets; [] = the config's

    @property
    def num_images(self) -> int:
        """Distinct training images (regularisation images not counted, repeats not applied)."""
        return sum(len(s.images) for s in self.subsets if not s.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Distinct regularisation images (repeats not applied)."""
        return sum(len(s.images) for s in self.subsets if s.is_reg)

    @property
    def num_train_items(self) -> int:
        """Training images times their folder's repeats: kohya's `ss_num_train_images`."""
        return sum(s.num_items for s in self.subsets if not s.is_reg)

    @property
    def num_reg_items(self) -> int:
        """Regularisation images times their folder's repeats, before balancing (kohya's `ss_num_reg_images`)."""
        return sum(s.num_items for s in self.subsets if s.is_reg)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Tag counts per folder name, tags split on ",", stripped and lowercased (kohya's `ss_tag_frequency`)."""
        frequency: dict[str, Counter[str]] = {}
        for subset in self.subsets:
            counter = frequency.setdefault(subset.name, Counter())
            for item in subset.images:
                counter.update(
                    tag.strip().lower() for tag in subset.caption_of(item).split(",") if tag.strip()
                )
        return {name: dict(counter) for name, counter in frequency.items()}

    def kohya_dataset_dirs(self, *, reg: bool) -> dict[str, dict[str, int]]:
        """kohya's `ss_dataset_dirs` (training folders) or `ss_reg_dataset_dirs` (regularisation folders): repeats
        and image count per folder name."""
        return {
            s.name: {"n_repeats": s.repeats, "img_count": len(s.images)}
            for s in self.subsets
            if s.is_reg == reg
        }

    def dataset_dirs_info(self) -> dict[str, dict[str, int]]:
        """Repeats and image count per folder name (kohya's `ss_dataset_dirs`)."""
        return {s.name: {"n_repeats": s.repeats, "img_count": len(s.images)} for s in self.subsets}


@dataclass
class DatasetListing:
    """What a dataset holds, read without raising: the usable subsets (what the trainer gets), every
    `<repeats>_<name>` folder and image file found (unusable ones too), warnings, ignored paths, and in `error` the
    DatasetError (or ConfigError) that makes it unusable (None when it is usable)."""

    subsets: list[Subset]
    folders: list[Subset]
    images: list[ListedImage]
    warnings: list[str]
    ignored: list[Path]
    error: DatasetError | ConfigError | None

    def scan(self) -> DatasetScan:
        """The trainer's DatasetScan; raises `error` when the dataset cannot be trained on."""
        if self.error is not None:
            raise self.error
        return DatasetScan(self.subsets, self.warnings, self.ignored)


@dataclass
class _Collector:
    """What the scan found and the problems gathered over all of it, so one error can list every culprit."""

    warnings: list[str] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    bad_files: list[tuple[Path, str]] = field(default_factory=list)
    zero_repeats: list[Path] = field(default_factory=list)
    folders: list[Subset] = field(default_factory=list)
    listed: list[ListedImage] = field(default_factory=list)


def _names(paths: list[Path], limit: int = 5) -> str:
    """A short list of file names for a warning ("a.png, b.png and 3 more")."""
    shown = ", ".join(p.name for p in paths[:limit])
    return f"{shown} and {len(paths) - limit} more" if len(paths) > limit else shown


def check_caption_extension(caption_extension: str) -> str:
    """A caption extension that pairs with `<basename><caption_extension>` ('.txt', '.caption', '.wd14.txt');
    ConfigError (key caption_extension) for anything else, an image extension included."""
    text = str(caption_extension)
    problem = None
    if not _CAPTION_EXTENSION.fullmatch(text):
        problem = (
            "must be a dot and a file extension (no slashes, control characters, "
            'any of :*?"<>| or a trailing dot or space)'
        )
    elif text.lower().rstrip(". ") in IMAGE_EXTENSIONS:
        problem = "is an image extension; captions are text files"
    if problem is not None:
        issue = ConfigIssue(
            f"caption extension {text!r} {problem}",
            key="caption_extension",
            hint='write e.g. ".txt" or ".caption"',
        )
        raise ConfigError([issue])
    return text


def _list_dir(path: Path, role: str) -> list[Path]:
    """Sorted, non-hidden entries of a folder; DatasetError if it is missing, not a folder or unreadable."""
    if not path.exists():
        raise DatasetError(
            f"{role} {path} does not exist",
            "check the path; it must be an existing folder",
            files=[str(path)],
        )
    if not path.is_dir():
        raise DatasetError(
            f"{role} {path} is a file, not a folder",
            "point it at the folder that holds the <repeats>_<name> folders",
            files=[str(path)],
        )
    try:
        entries = list(path.iterdir())
    except OSError as error:
        raise DatasetError(
            f"{role} {path} cannot be read ({error.strerror or error})",
            "make the folder readable by the user running the trainer",
            files=[str(path)],
        ) from error
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _no_folders_error(root: Path, role: str, odd_folders: list[Path], loose: list[Path]) -> DatasetError:
    """Explain the `<repeats>_<name>` convention and what was found instead."""
    found = [f"folder '{p.name}'" for p in odd_folders] + [f"file '{p.name}'" for p in loose]
    found_text = ", ".join(found) if found else "nothing (the folder is empty)"
    loose_images = [p for p in loose if is_image_file(p)]
    if loose_images and SUBSET_FOLDER.match(root.name):
        hint = f"{role} points at an image folder itself; set it to its parent folder {root.parent}"
    elif loose_images:
        hint = f"move the {len(loose_images)} image(s) into a folder such as {root / '10_mysubject'}"
    elif odd_folders:
        first = odd_folders[0].name
        hint = f"rename the folder '{first}' to e.g. '10_{first}' (10 repeats, class token '{first}')"
    else:
        hint = f"create a folder such as {root / '10_mysubject'} and put the images (and captions) in it"
    return DatasetError(
        f"no training folders found in {role} {root}: images must be in subfolders named "
        f"<repeats>_<name>, e.g. '10_mysubject' (each image repeated 10 times per epoch, class token "
        f"'mysubject'). Found: {found_text}",
        hint,
        files=[str(p) for p in odd_folders + loose],
    )


def _warn_ignored(root: Path, role: str, odd_folders: list[Path], loose: list[Path], col: _Collector) -> None:
    """Record folders and files that kohya would skip at the top of a dataset root."""
    col.ignored.extend(odd_folders + loose)
    if odd_folders:
        col.warnings.append(
            f"{role} {root}: ignored {len(odd_folders)} folder(s) not named <repeats>_<name> "
            f"(e.g. 10_{odd_folders[0].name}): {_names(odd_folders)}"
        )
    if loose:
        col.warnings.append(
            f"{role} {root}: ignored {len(loose)} file(s) lying directly in it (images must be inside "
            f"a <repeats>_<name> folder): {_names(loose)}"
        )


def _read_caption(image: Path, caption_extension: str, col: _Collector) -> tuple[str | None, bool]:
    """First line of `<basename><caption_extension>`, stripped; (None, exists) when absent or empty."""
    caption_path = image.with_name(image.stem + caption_extension)
    if not caption_path.is_file():
        return None, False
    try:
        text = caption_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        col.bad_files.append((caption_path, "the caption file is not UTF-8 text"))
        return None, True
    except OSError as error:
        col.bad_files.append((caption_path, f"the caption file cannot be read ({error.strerror or error})"))
        return None, True
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    return (first or None), True


def _warn_uncaptioned(
    subset: Subset, missing: list[Path], empty: list[Path], caption_extension: str, col: _Collector
) -> None:
    """One warning per folder for images trained with the class token because they have no caption."""
    used = f"the class token '{subset.class_token}'" if subset.class_token else "an empty caption"
    if missing:
        message = (
            f"{subset.path}: {len(missing)} of {len(subset.images)} image(s) have no caption file "
            f"<basename>{caption_extension}; {used} is used as their caption: {_names(missing)}"
        )
        others = [
            ext
            for ext in _KNOWN_CAPTION_EXTENSIONS
            if ext != caption_extension and any(p.with_name(p.stem + ext).is_file() for p in missing)
        ]
        if others:
            message += (
                f" (found {', '.join(others)} files next to them: should caption_extension be {others[0]!r}?)"
            )
        col.warnings.append(message)
    if empty:
        col.warnings.append(
            f"{subset.path}: {len(empty)} caption file(s) are empty; {used} is used instead: {_names(empty)}"
        )


def _warn_leftovers(
    folder: Path, entries: list[Path], images: list[Path], caption_extension: str, col: _Collector
) -> None:
    """Record subfolders, orphan captions and other files inside a subset folder (not trained on)."""
    wanted = {p.stem + caption_extension for p in images}
    image_names = {p.name for p in images}
    orphans = [e for e in entries if e.name.endswith(caption_extension) and e.name not in wanted]
    others = [e for e in entries if e.name not in image_names and e.name not in wanted]
    col.ignored.extend(others)
    subdirs = [e for e in others if e.is_dir()]
    files = [e for e in others if not e.is_dir() and e not in orphans]
    if subdirs:
        col.warnings.append(
            f"{folder}: ignored {len(subdirs)} subfolder(s) (not searched): {_names(subdirs)}"
        )
    if orphans:
        col.warnings.append(
            f"{folder}: ignored {len(orphans)} caption file(s) without an image: {_names(orphans)}"
        )
    if files:
        col.warnings.append(
            f"{folder}: ignored {len(files)} file(s) that are not images ({_EXTENSIONS_TEXT}) "
            f"or {caption_extension} captions: {_names(files)}"
        )


def _scan_subset(
    folder: Path,
    repeats: int,
    class_token: str,
    caption_extension: str,
    *,
    is_reg: bool,
    verify: bool,
    col: _Collector,
) -> Subset:
    """Read one `<repeats>_<name>` folder: probe each image and pair its caption."""
    entries = _list_dir(folder, "dataset folder")
    image_paths = [e for e in entries if is_image_file(e) and e.is_file()]
    subset = Subset(folder, folder.name, repeats, class_token, [], is_reg)
    col.folders.append(subset)
    missing: list[Path] = []
    empty: list[Path] = []
    for path in image_paths:
        caption, exists = _read_caption(path, caption_extension, col)
        try:
            width, height = probe_image(path, full_decode=verify)
        except BadImageError as error:
            col.bad_files.append((path, error.reason))
            col.listed.append(ListedImage(path, folder.name, caption, error.reason))
            continue
        col.listed.append(ListedImage(path, folder.name, caption))
        if caption is None:
            (empty if exists else missing).append(path)
        subset.images.append(ImageItem(path, caption, width, height))
    _warn_uncaptioned(subset, missing, empty, caption_extension, col)
    _warn_leftovers(folder, entries, image_paths, caption_extension, col)
    return subset


def _scan_root(
    root: Path, role: str, caption_extension: str, *, is_reg: bool, verify: bool, col: _Collector
) -> list[Subset]:
    """Scan every `<repeats>_<name>` folder of one dataset root (train or reg); the ones with 0 repeats are listed
    (their images shown) but not returned, and make the scan fail."""
    entries = _list_dir(root, role)
    folders: list[tuple[Path, int, str]] = []
    odd_folders: list[Path] = []
    loose: list[Path] = []
    for entry in entries:
        match = SUBSET_FOLDER.match(entry.name) if entry.is_dir() else None
        if match is None:
            (odd_folders if entry.is_dir() else loose).append(entry)
        else:
            folders.append((entry, int(match.group(1)), match.group(2)))
    if not folders:
        raise _no_folders_error(root, role, odd_folders, loose)
    _warn_ignored(root, role, odd_folders, loose, col)
    subsets = []
    for path, repeats, token in folders:
        subset = _scan_subset(path, repeats, token, caption_extension, is_reg=is_reg, verify=verify, col=col)
        if repeats == 0:
            col.zero_repeats.append(path)
        else:
            subsets.append(subset)
    return subsets


def _raise_collected(col: _Collector) -> None:
    """Raise one DatasetError naming every zero-repeat folder, or else every unusable file."""
    if col.zero_repeats:
        first = col.zero_repeats[0].name
        raise DatasetError(
            f"{len(col.zero_repeats)} folder(s) have 0 repeats, so their images would never be trained on: "
            + ", ".join(str(p) for p in col.zero_repeats),
            f"use at least 1 repeat, e.g. rename '{first}' to '1{first[first.index('_') :]}'",
            files=[str(p) for p in col.zero_repeats],
        )
    if col.bad_files:
        lines = "\n".join(f"  - {path}: {reason}" for path, reason in col.bad_files)
        raise DatasetError(
            f"{len(col.bad_files)} file(s) in the dataset cannot be used:\n{lines}",
            "fix, re-export or remove these files, then scan again",
            files=[str(path) for path, _ in col.bad_files],
        )


def _keep_nonempty(root: Path, role: str, subsets: list[Subset], col: _Collector) -> list[Subset]:
    """Drop folders without images (with a warning); DatasetError if none has any."""
    kept = [s for s in subsets if s.images]
    empty = [s.path for s in subsets if not s.images]
    if subsets and not kept:
        raise DatasetError(
            f"no images found in {role} {root}: the folder(s) {_names(empty, 20)} contain no "
            f"{_EXTENSIONS_TEXT} files (any case; subfolders are not searched)",
            "put the images directly inside the <repeats>_<name> folder(s)",
            files=[str(p) for p in empty],
        )
    if empty:
        col.ignored.extend(empty)
        col.warnings.append(f"{role} {root}: skipped {len(empty)} folder(s) with no images: {_names(empty)}")
    return kept


def list_dataset(
    train_data_dir: Path,
    caption_extension: str = ".caption",
    *,
    reg_data_dir: Path | None = None,
    verify_images: bool = True,
) -> DatasetListing:
    """Read a kohya dataset as scan_dataset does, without raising: what is wrong is in the listing's `error`."""
    col = _Collector()
    subsets: list[Subset] = []
    error: DatasetError | ConfigError | None = None
    try:
        check_caption_extension(caption_extension)
        train_root = Path(train_data_dir)
        train = _scan_root(
            train_root, "train_data_dir", caption_extension, is_reg=False, verify=verify_images, col=col
        )
        reg: list[Subset] = []
        if reg_data_dir is not None:
            reg = _scan_root(
                Path(reg_data_dir),
                "reg_data_dir",
                caption_extension,
                is_reg=True,
                verify=verify_images,
                col=col,
            )
        _raise_collected(col)
        subsets = _keep_nonempty(train_root, "train_data_dir", train, col)
        if reg_data_dir is not None:
            subsets += _keep_nonempty(Path(reg_data_dir), "reg_data_dir", reg, col)
    except (DatasetError, ConfigError) as exc:
        error, subsets = exc, []
    return DatasetListing(subsets, col.folders, col.listed, col.warnings, col.ignored, error)


def scan_dataset(
    train_data_dir: Path,
    caption_extension: str = ".caption",
    *,
    reg_data_dir: Path | None = None,
    verify_images: bool = True,
) -> DatasetScan:
    """Scan and validate a kohya dataset; raise DatasetError listing every problem, return warnings."""
    return list_dataset(
        train_data_dir, caption_extension, reg_data_dir=reg_data_dir, verify_images=verify_images
    ).scan()
