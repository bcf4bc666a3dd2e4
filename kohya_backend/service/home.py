"""The extension's home folder: where models, datasets, LoRAs, the job database and job folders live.

Every path that reaches the service from outside (a model or dataset name, a path inside config_params) is resolved
here, and refused when it leaves the roots the extension manages: `..`, an absolute path elsewhere, or a symlink
that points out.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kohya_backend.errors import DatasetError, TrainManagementError
from kohya_backend.jobs.store import DB_NAME, JOBS_DIR

DEFAULT_HOME = "train_management_home"  # the command line's home (the WebUI's lives in its data folder)
MODELS_DIR = "models"
DATASETS_DIR = "datasets"
LORA_DIR = "lora"
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEFAULT_CAPTION_EXTENSION = ".txt"


class PathOutsideHome(TrainManagementError):
    """A path given by a client leaves the folders the extension manages."""


class NotInHome(TrainManagementError):
    """A model or dataset name that does not exist under its root; the message lists what does."""

    http_status = 404


MAX_NAME_BYTES = 255  # one file or folder name (NAME_MAX on Linux and macOS; 255 UTF-16 units on Windows)
MAX_PATH_BYTES = 4095  # a whole path (PATH_MAX on Linux, less its terminating NUL)


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _check_length(path: Path, what: str) -> None:
    """PathOutsideHome when `path` (or one of its names) is longer than any file system holds: such a path names
    nothing, and asking the file system about it raises ENAMETOOLONG (a 500) instead of answering "no such file"."""
    longest = max(path.parts, key=_size, default="")
    if _size(longest) > MAX_NAME_BYTES:
        shown = longest if len(longest) <= 40 else f"{longest[:40]}..."
        raise PathOutsideHome(
            f"{what} holds the name {shown!r} of {_size(longest)} bytes: a file or folder name has at most "
            f"{MAX_NAME_BYTES}",
            "use a shorter name",
        )
    if _size(str(path)) > MAX_PATH_BYTES:
        raise PathOutsideHome(
            f"{what} is a path of {_size(str(path))} bytes: a path has at most {MAX_PATH_BYTES}",
            "use a shorter name",
        )


@dataclass(frozen=True)
class _Cached:
    stamp: tuple[float, int]
    entry: dict[str, Any]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


class Home:
    """The home folder layout (models/, datasets/, lora/, jobs/, jobs.sqlite3) and safe path resolution in it.

    `lora_dir` overrides where finished LoRAs go (the WebUI passes its Lora folder) and `models_dirs` where
    checkpoints are found: the WebUI passes its checkpoint folders (--ckpt-dir, then
    models/Stable-diffusion, as it lists them), so model names are its checkpoint names, each relative to the
    folder it lies in (the first folder's file wins a name two share). All count as roots; `models` is the first.
    """

    def __init__(
        self,
        root: Path,
        *,
        lora_dir: Path | None = None,
        models_dirs: Sequence[Path] | None = None,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        chosen = [Path(folder).expanduser().resolve() for folder in models_dirs or ()]
        found = chosen or [self.root / MODELS_DIR]
        self.model_roots: tuple[Path, ...] = tuple(dict.fromkeys(found))  # in order, each once
        self.models = self.model_roots[0]
        self.datasets = self.root / DATASETS_DIR
        self.lora = Path(lora_dir).expanduser().resolve() if lora_dir is not None else self.root / LORA_DIR
        self.jobs = self.root / JOBS_DIR
        self.db_path = self.root / DB_NAME
        for folder in (self.root, self.models, self.datasets, self.lora, self.jobs):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrainManagementError(
                    f"cannot create the folder {folder}: {exc.strerror}",
                    "choose a home directory you can write to (--home DIR)",
                ) from exc
        self._cache: dict[Path, _Cached] = {}
        self._cache_lock = threading.Lock()

    def roots(self) -> dict[str, Path]:
        """The managed roots by name; client paths must stay inside one of these."""
        return {"models": self.models, "datasets": self.datasets, "lora": self.lora, "jobs": self.jobs}

    def resolve(self, value: str, roots: list[Path], *, what: str, owner_links: bool = False) -> Path:
        """Resolve a client path (relative to the first root, or absolute) and refuse it if it leaves `roots`.

        Symlinks are followed before the check, so a link inside a root that points elsewhere is refused. With
        `owner_links` (names picked from a listing of a root: models, datasets) the check is on the path as
        named, so a checkpoint the machine's owner linked in from another drive is usable; clients cannot make
        links there (uploads refuse them), and '..' is refused either way. `models` in `roots` stands for every
        model root.
        """
        roots = [r for root in roots for r in (self.model_roots if root == self.models else (root,))]
        text = str(value)
        if not text.strip() or "\x00" in text:
            raise PathOutsideHome(
                f"{what} {text!r} is not a usable path", "give a name inside the home folders"
            )
        try:
            path = Path(text).expanduser()
        except (RuntimeError, KeyError):  # `~name` of no user: a name like any other
            path = Path(text)
        if ".." in path.parts:
            raise PathOutsideHome(
                f"{what} {text!r} contains '..'", f"name it relative to {roots[0]} without '..'"
            )
        candidate = path if path.is_absolute() else roots[0] / path
        _check_length(candidate, what)
        if owner_links:
            resolved = Path(os.path.abspath(candidate))
            real_roots = [Path(os.path.abspath(r)) for r in roots]
        else:
            resolved = Path(os.path.realpath(candidate))
            real_roots = [Path(os.path.realpath(r)) for r in roots]
        if not any(_inside(resolved, r) for r in real_roots):
            names = ", ".join(str(r) for r in roots)
            raise PathOutsideHome(
                f"{what} {text!r} resolves to {resolved}, outside the folders Train Management manages ({names})",
                "put the file inside the home folder and name it relative to it (symlinks pointing out are refused)",
            )
        return resolved

    def model_path(self, name: str) -> Path:
        """The checkpoint file `name` (relative to a model root, the first that has it, or absolute inside one);
        NotInHome (listing the models) when there is none."""
        path = self.resolve(name, [self.models], what="model", owner_links=True)
        candidates = [path]
        if not Path(str(name)).expanduser().is_absolute():
            candidates = [Path(os.path.abspath(root / str(name))) for root in self.model_roots]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            known = [model_name for model_name, _ in self._model_files()]
            folders = ", ".join(str(root) for root in self.model_roots)
            raise NotInHome(
                f"model {name!r} does not exist in {folders}",
                f"choose one of: {', '.join(known) or '(none: copy a checkpoint into that folder)'}",
            )
        return found

    def dataset_path(self, name: str) -> Path:
        """The dataset folder `name` under datasets/; NotInHome (listing the datasets) when there is none."""
        path = self.resolve(name, [self.datasets], what="dataset", owner_links=True)
        if not path.is_dir():
            known = [d.name for d in self._dataset_dirs()]
            raise NotInHome(
                f"dataset {name!r} does not exist in {self.datasets}",
                f"choose one of: {', '.join(known) or '(none: copy a dataset folder there)'}",
            )
        return path

    def model_name(self, name: str) -> str:
        """The canonical name of model `name`, however it was spelled (`./m.safetensors`, an absolute path inside a
        root): its path relative to the model root it lies in. NotInHome when there is no such model."""
        path = self.model_path(name)
        for root in self.model_roots:
            if _inside(path, Path(os.path.abspath(root))):
                return path.relative_to(os.path.abspath(root)).as_posix()
        return path.name  # not reached: model_path only finds files inside a root

    def dataset_name(self, name: str) -> str:
        """The canonical name of dataset `name`, however it was spelled (`./d`, `d/`, an absolute path inside
        datasets/): its folder relative to datasets/. The datasets folder itself is not a dataset."""
        path = self.dataset_path(name)
        relative = path.relative_to(os.path.abspath(self.datasets)).as_posix()
        if relative in ("", "."):
            raise PathOutsideHome(
                f"dataset {name!r} names the datasets folder itself, not a dataset in it",
                f"choose one of: {', '.join(self.dataset_names()) or '(none yet)'}",
            )
        return relative

    def _model_files(self) -> list[tuple[str, Path]]:
        """(name, file) of every checkpoint under the model roots, by name; a name is relative to its root, and
        a name (or a file, for nested roots) already found under an earlier root is not listed again."""
        found: dict[str, Path] = {}
        seen: set[str] = set()
        for root in self.model_roots:
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                if path.suffix.lower() not in MODEL_SUFFIXES or not path.is_file():
                    continue
                name, real = path.relative_to(root).as_posix(), os.path.abspath(path)
                if name not in found and real not in seen:
                    found[name] = path
                    seen.add(real)
        return sorted(found.items())

    def _dataset_dirs(self) -> list[Path]:
        return sorted(p for p in self.datasets.iterdir() if p.is_dir() and not p.name.startswith("."))

    def model_names(self) -> list[str]:
        """The checkpoint names under the model roots, sorted (no file is read: what a dropdown needs)."""
        return [name for name, _ in self._model_files()]

    def dataset_names(self) -> list[str]:
        """The dataset folder names under datasets/, sorted (nothing is scanned: what a dropdown needs)."""
        return [folder.name for folder in self._dataset_dirs()]

    def list_models(self) -> list[dict[str, Any]]:
        """Checkpoints under the model roots with their size and detected family, or why one cannot be read."""
        return [self._cached(path, name, self._describe_model) for name, path in self._model_files()]

    def describe_model(self, name: str) -> dict[str, Any]:
        """One checkpoint's entry of list_models (cached like it); NotInHome when there is no such model."""
        return self._cached(self.model_path(name), str(name), self._describe_model)

    def _describe_model(self, name: str, path: Path) -> dict[str, Any]:
        from kohya_backend.models.detect import detect_family
        from kohya_backend.models.keys import read_keys

        entry: dict[str, Any] = {
            "name": name,
            "size": path.stat().st_size,
            "family": None,
            "error": None,
        }
        try:
            entry["family"] = detect_family(read_keys(path))
        except TrainManagementError as exc:
            entry["error"] = str(exc)
        except Exception as exc:  # one unreadable file must not break the whole listing
            entry["error"] = f"cannot read {path.name}: {type(exc).__name__}: {exc}"
        return entry

    def _cached(self, path: Path, name: str, build: Any) -> dict[str, Any]:
        """Memoise per path on (mtime, size): listing stays cheap when many clients poll it."""
        stat = path.stat()
        stamp = (stat.st_mtime, stat.st_size)
        with self._cache_lock:
            hit = self._cache.get(path)
        if hit is not None and hit.stamp == stamp and hit.entry["name"] == name:
            return dict(hit.entry)
        entry = build(name, path)
        with self._cache_lock:
            self._cache[path] = _Cached(stamp, entry)
        return dict(entry)

    def list_datasets(self, caption_extension: str = DEFAULT_CAPTION_EXTENSION) -> list[dict[str, Any]]:
        """Dataset folders under datasets/ with a scan summary (subsets, images, repeats) or the scan error."""
        from kohya_backend.data.scan import scan_dataset

        out = []
        for folder in self._dataset_dirs():
            entry: dict[str, Any] = {"name": folder.name, "summary": None, "error": None}
            try:
                scan = scan_dataset(folder, caption_extension, verify_images=False)
                entry["summary"] = {
                    "images": scan.num_images,
                    "train_items": scan.num_train_items,
                    "subsets": scan.dataset_dirs_info(),
                    "warnings": scan.warnings,
                }
            except DatasetError as exc:
                entry["error"] = {"message": str(exc), "files": [str(f) for f in exc.files]}
            except TrainManagementError as exc:
                entry["error"] = {"message": str(exc), "files": []}
            out.append(entry)
        return out
