"""Delivery: copy a finished LoRA and its WebUI sidecars into the Lora folder, atomically and never overwriting.

Every file is first written under a hidden temporary name in the Lora folder and fsynced; the LoRA then takes
its final name with a hard link (which fails instead of replacing an existing file), the sidecars follow, and
any failure removes everything this delivery wrote, so the WebUI never lists a half-copied LoRA.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from safetensors import SafetensorError, safe_open

from kohya_backend.errors import TrainingError
from kohya_backend.families import FAMILIES
from kohya_backend.fileio import fsync_dir
from kohya_backend.job_folder import GRID_SUFFIX as GRID_SUFFIX
from kohya_backend.job_folder import JobFolder
from kohya_backend.jobs.runner import RESULT_NAME, read_json
from kohya_backend.jobs.store import Job

Writer = Callable[[IO[bytes], bytes], object]
CHUNK_BYTES = 1 << 20
TOP_TAGS = 3
_MAX_SUFFIX = 10_000
GRID_SIDECAR = ".epochs.png"  # the same beside the delivered LoRA
_SD_VERSION = {name: family.sidecar_sd_version for name, family in FAMILIES.items()}
_REPEATS_PREFIX = re.compile(r"^\d+_")
# Filesystems without hard links: fall back to an existence check plus rename.
NO_LINK_ERRNOS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}


def _plain_write(handle: IO[bytes], data: bytes) -> object:
    return handle.write(data)


def final_lora(job: Job) -> Path:
    """The finished LoRA in the job folder: result.json's `output`, else DIR/output/<output_name>.safetensors."""
    result = read_json(job.folder / RESULT_NAME) or {}
    output = result.get("output")
    path = Path(output) if isinstance(output, str) and output else JobFolder(job.folder).lora(job.output_name)
    if not path.is_file():
        raise TrainingError(
            f"job {job.id}: the finished LoRA {path} does not exist",
            "look at the job's train.log; resume the job to train and save it again",
        )
    return path


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a LoRA's safetensors header (ss_* keys and modelspec.*)."""
    try:
        with safe_open(str(path), framework="np") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise TrainingError(
            f"the finished LoRA {path} cannot be read: {exc}",
            "the file is damaged; resume the job to save it again",
        ) from exc


def _tag_frequency(metadata: dict[str, str]) -> dict[str, dict[str, int]]:
    try:
        data = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)}


def activation_text(metadata: dict[str, str], *, top_tags: int = TOP_TAGS) -> str:
    """Class tokens of the dataset folders (`10_sks dog` -> `sks dog`) then the most frequent caption tags."""
    frequency = _tag_frequency(metadata)
    classes: list[str] = []
    for folder in frequency:
        base = Path(folder).name
        token = _REPEATS_PREFIX.sub("", base, count=1).strip()
        if _REPEATS_PREFIX.match(base) and token and token not in classes:
            classes.append(token)
    counts: Counter[str] = Counter()
    for folder_tags in frequency.values():
        for tag, count in folder_tags.items():
            if isinstance(count, int) and not isinstance(count, bool) and tag.strip():
                counts[tag.strip()] += count
    # most_common keeps first-seen order among equal counts, so the result is stable.
    top = [tag for tag, _count in counts.most_common() if tag not in classes][:top_tags]
    return ", ".join([*classes, *top])


def sidecar(job: Job, metadata: dict[str, str], *, preferred_weight: float = 1.0) -> dict[str, Any]:
    """The WebUI's user-metadata sidecar (<name>.json) for a LoRA trained by `job`."""
    return lora_sidecar(
        metadata,
        fm_type=job.fm_type,
        model=job.model,
        dataset=job.dataset,
        job_id=job.id,
        config_toml=job.config_toml,
        preferred_weight=preferred_weight,
    )


def lora_sidecar(
    metadata: dict[str, str],
    *,
    fm_type: str,
    model: str,
    dataset: str,
    job_id: str,
    config_toml: str,
    preferred_weight: float = 1.0,
) -> dict[str, Any]:
    """The sidecar from the job's fields (the SageMaker container, which has no Job, writes one too)."""
    version = _SD_VERSION.get(fm_type)
    if version is None:
        version = "SDXL" if metadata.get("ss_base_model_version", "").startswith("sdxl") else "SD1"
    steps = metadata.get("ss_steps", "?")
    epochs = metadata.get("ss_epoch", "?")
    description = (
        f"{version} LoRA trained on {Path(dataset).name or dataset} from {Path(model).name}: "
        f"{steps} steps, {epochs} epoch(s)"
    )
    notes = (
        f"Trained by Train Management, job {job_id}.\n"
        f"Base model: {model}\nDataset: {dataset}\n\nconfig_params:\n{config_toml}"
    )
    return {
        "description": description,
        "sd version": version,
        "activation text": activation_text(metadata),
        "preferred weight": preferred_weight,
        "negative text": "",
        "notes": notes,
    }


def last_sample(job: Job) -> Path | None:
    """The newest sample image the trainer wrote (DIR/output/sample/*.png), or None."""
    folder = JobFolder(job.folder).samples
    if not folder.is_dir():
        return None
    pngs = [p for p in folder.glob("*.png") if p.is_file()]
    return max(pngs, key=lambda p: (p.stat().st_mtime_ns, p.name)) if pngs else None


def grid_file(job: Job) -> Path | None:
    """The job's epoch comparison grid (DIR/output/<output_name>-epochs.png), or None when it has none."""
    path = JobFolder(job.folder).grid(job.output_name)
    return path if path.is_file() else None


def saved_epochs(job: Job) -> dict[int, Path]:
    """The epoch LoRAs (<output_name>-NNNNNN.safetensors) still in the job's output folder, by epoch."""
    pattern = re.compile(rf"^{re.escape(job.output_name)}-(\d{{6}})\.safetensors$")
    folder = JobFolder(job.folder).output
    found = {}
    for path in folder.glob("*.safetensors") if folder.is_dir() else []:
        match = pattern.match(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def deliver_epoch(job: Job, epoch: int, lora_dir: Path, name: str) -> Path:
    """One saved epoch of a delivered job in the Lora folder, as `keep_epochs` would have placed it
    (<name>-epochs/<name>-NNNNNN.safetensors): the file already there, or copied now (atomically, never over
    another file). `name` is the delivered LoRA's name."""
    source = saved_epochs(job).get(epoch)
    if source is None:
        raise TrainingError(
            f"job {job.id} has no saved epoch {epoch}",
            f"saved epochs: {', '.join(map(str, saved_epochs(job))) or 'none'} (save_every_n_epochs saves them)",
        )
    folder = lora_dir / f"{name}-epochs"
    dest = folder / f"{name}-{epoch:06d}.safetensors"
    if dest.is_file() and dest.stat().st_size == source.stat().st_size:
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    batch = _Batch(folder, _plain_write)
    try:
        tmp = batch.copy(source, folder)
        for candidate in _candidates(dest.stem):
            if _place(tmp, folder / f"{candidate}.safetensors"):
                batch.temps.remove(tmp)
                fsync_dir(folder)
                return folder / f"{candidate}.safetensors"
    except OSError as exc:
        batch.rollback()
        raise TrainingError(
            f"could not copy epoch {epoch} of job {job.id} to {folder}: {exc.strerror or exc}",
            "free space in (or fix the permissions of) the Lora folder",
        ) from exc
    batch.rollback()
    raise TrainingError(f"no free file name for {dest.stem} in {folder}", "clean up the Lora folder")


def epoch_files(job: Job, final: Path) -> list[Path]:
    """The intermediate LoRAs (per epoch or per N steps) still in the job's output folder, oldest first."""
    folder = final.parent
    pattern = re.compile(rf"^{re.escape(job.output_name)}-(\d{{6}}|step\d{{8}})\.safetensors$")
    return sorted(p for p in folder.iterdir() if pattern.match(p.name) and p.is_file())


@dataclass
class _Batch:
    """Temporary files of one delivery and the final paths placed so far (undone together on failure)."""

    folder: Path
    write: Writer
    temps: list[Path] = field(default_factory=list)
    placed: list[Path] = field(default_factory=list)
    made_dirs: list[Path] = field(default_factory=list)

    def temp(self, folder: Path) -> Path:
        """A fresh hidden temporary name in `folder` (the WebUI lists no .tmp files), tracked for rollback."""
        path = folder / f".tm-delivery-{secrets.token_hex(6)}.tmp"
        self.temps.append(path)
        return path

    def write_bytes(self, folder: Path, data: bytes) -> Path:
        """Write `data` to a new fsynced temporary file in `folder`."""
        tmp = self.temp(folder)
        with open(tmp, "xb") as handle:
            self.write(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def copy(self, source: Path, folder: Path) -> Path:
        """Copy `source` chunk by chunk to a new fsynced temporary file in `folder`."""
        tmp = self.temp(folder)
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            while chunk := src.read(CHUNK_BYTES):
                self.write(dst, chunk)
            dst.flush()
            os.fsync(dst.fileno())
        return tmp

    def rollback(self) -> None:
        """Remove every file and folder this delivery created (placed or temporary)."""
        for path in [*self.placed, *self.temps]:
            with contextlib.suppress(OSError):
                path.unlink()
        for folder in reversed(self.made_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _place(tmp: Path, dest: Path) -> bool:
    """Give `tmp` the name `dest` unless that name exists; True on success. Atomic where hard links work."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in NO_LINK_ERRNOS:
            raise
        if dest.exists():
            return False
        os.replace(tmp, dest)
        return True
    tmp.unlink()
    return True


def _name_free(folder: Path, stem: str) -> bool:
    return not any((folder / f"{stem}{ext}").exists() for ext in (".safetensors", ".json", ".preview.png"))


def _candidates(stem: str) -> Iterator[str]:
    yield stem
    for n in range(1, _MAX_SUFFIX):
        yield f"{stem}-{n}"


def _claim_lora(batch: _Batch, tmp: Path, lora_dir: Path, stem: str) -> str:
    """Link the LoRA under the first free name (stem, stem-1, stem-2, ...) and return that name."""
    for name in _candidates(stem):
        if _name_free(lora_dir, name) and _place(tmp, lora_dir / f"{name}.safetensors"):
            batch.placed.append(lora_dir / f"{name}.safetensors")
            batch.temps.remove(tmp)
            return name
    raise TrainingError(
        f"no free file name for {stem} in {lora_dir} (tried {_MAX_SUFFIX} suffixes)",
        "clean up the Lora folder or choose another output_name",
    )


def _place_required(batch: _Batch, tmp: Path, dest: Path) -> None:
    if not _place(tmp, dest):
        raise FileExistsError(errno.EEXIST, "another file took this name during delivery", str(dest))
    batch.placed.append(dest)
    batch.temps.remove(tmp)


def _deliver_epochs(batch: _Batch, job: Job, final: Path, lora_dir: Path, name: str) -> None:
    files = epoch_files(job, final)
    if not files:
        return
    folder = lora_dir / f"{name}-epochs"
    if not folder.exists():
        folder.mkdir()
        batch.made_dirs.append(folder)
    for source in files:
        tmp = batch.copy(source, folder)
        stem = name + source.name[len(job.output_name) : -len(".safetensors")]
        for candidate in _candidates(stem):
            if _place(tmp, folder / f"{candidate}.safetensors"):
                batch.placed.append(folder / f"{candidate}.safetensors")
                batch.temps.remove(tmp)
                break
    fsync_dir(folder)


def deliver(
    job: Job,
    lora_dir: Path,
    *,
    keep_epochs: bool = False,
    preferred_weight: float = 1.0,
    write: Writer | None = None,
) -> list[Path]:
    """Copy the job's final LoRA, <name>.json, <name>.preview.png and <name>.epochs.png (the epoch comparison grid,
    when the trainer made one) into `lora_dir`; return the paths written.

    The name is the job's output name, or name-1, name-2, ... when a file of that name exists (Forge caches LoRAs
    by name, so an existing file is never replaced). With `keep_epochs`, intermediate saves go to <name>-epochs/.
    `write(handle, chunk)` writes every byte (tests inject one that fails); on any error nothing is left behind.
    """
    final = final_lora(job)
    metadata = read_lora_metadata(final)
    lora_dir.mkdir(parents=True, exist_ok=True)
    batch = _Batch(lora_dir, write or _plain_write)
    try:
        lora_tmp = batch.copy(final, lora_dir)
        side = json.dumps(
            sidecar(job, metadata, preferred_weight=preferred_weight), indent=2, ensure_ascii=False
        )
        side_tmp = batch.write_bytes(lora_dir, (side + "\n").encode("utf-8"))
        sample = last_sample(job)
        preview_tmp = batch.copy(sample, lora_dir) if sample is not None else None
        name = _claim_lora(batch, lora_tmp, lora_dir, job.output_name)
        _place_required(batch, side_tmp, lora_dir / f"{name}.json")
        if preview_tmp is not None:
            _place_required(batch, preview_tmp, lora_dir / f"{name}.preview.png")
        grid = grid_file(job)
        if grid is not None:  # beside the LoRA; a file already of that name is left alone
            grid_tmp = batch.copy(grid, lora_dir)
            if _place(grid_tmp, lora_dir / f"{name}{GRID_SIDECAR}"):
                batch.placed.append(lora_dir / f"{name}{GRID_SIDECAR}")
                batch.temps.remove(grid_tmp)
        if keep_epochs:
            _deliver_epochs(batch, job, final, lora_dir, name)
        fsync_dir(lora_dir)
    except OSError as exc:
        batch.rollback()
        raise TrainingError(
            f"job {job.id}: could not deliver {final.name} to {lora_dir}: {exc.strerror or exc}",
            f"the trained LoRA is kept at {final}; free space in (or fix the permissions of) the Lora folder, "
            "then copy it there or resume the job",
        ) from exc
    except BaseException:
        batch.rollback()
        raise
    return list(batch.placed)
