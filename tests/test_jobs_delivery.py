"""Delivery of a finished LoRA into the Lora folder: sidecars, unique names, epochs, and no partial files on ENOSPC."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from kohya_backend.errors import TrainingError
from kohya_backend.jobs.delivery import CHUNK_BYTES, activation_text, deliver, final_lora, sidecar
from kohya_backend.jobs.store import Job, JobStore

TAGS = {
    "10_sks dog": {"sks dog": 4, "grass": 3, "ball": 2, "sky": 1},
    "5_red hat": {"red hat": 2, "grass": 2},
}


def _job(tmp_path: Path, *, fm_type: str = "sd_1_5", name: str = "mydog") -> Job:
    store = JobStore(tmp_path / "home")
    return store.create(
        fm_type=fm_type,
        model="/models/base-v1.safetensors",
        dataset="/data/dogs",
        instance_type="local",
        output_name=name,
        config_toml=f'output_name = "{name}"\nnetwork_dim = 8\n',
        params={},
    )


def _write_lora(path: Path, *, megabytes: float = 0.1, tags: dict | None = None, seed: int = 0) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    count = int(megabytes * (1 << 20) / 4)
    tensors = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": rng.standard_normal(
            count, dtype=np.float32
        ),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": np.array(8.0, dtype=np.float32),
    }
    metadata = {
        "ss_tag_frequency": json.dumps(TAGS if tags is None else tags),
        "ss_steps": "120",
        "ss_epoch": "3",
        "ss_base_model_version": "sd_v1",
    }
    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


def _sample(folder: Path, name: str, color: tuple[int, int, int], mtime: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", (16, 16), color).save(path)
    os.utime(path, (mtime, mtime))
    return path


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deliver_copies_lora_sidecar_and_newest_sample(tmp_path: Path) -> None:
    job = _job(tmp_path)
    data = _write_lora(job.folder / "output" / "mydog.safetensors")
    _sample(job.folder / "output" / "sample", "mydog_e000001_00.png", (255, 0, 0), 1_000)
    newest = _sample(job.folder / "output" / "sample", "mydog_e000002_00.png", (0, 0, 255), 2_000)
    lora_dir = tmp_path / "Lora"

    paths = deliver(job, lora_dir)

    assert paths == [lora_dir / "mydog.safetensors", lora_dir / "mydog.json", lora_dir / "mydog.preview.png"]
    assert (lora_dir / "mydog.safetensors").read_bytes() == data
    assert (lora_dir / "mydog.preview.png").read_bytes() == newest.read_bytes()
    side = json.loads((lora_dir / "mydog.json").read_text(encoding="utf-8"))
    assert side["sd version"] == "SD1"
    assert side["activation text"] == "sks dog, red hat, grass, ball, sky"
    assert side["preferred weight"] == 1.0
    assert job.id in side["notes"] and 'output_name = "mydog"' in side["notes"]
    assert "120 steps" in side["description"] and "base-v1.safetensors" in side["description"]
    assert sorted(p.name for p in lora_dir.iterdir()) == [
        "mydog.json",
        "mydog.preview.png",
        "mydog.safetensors",
    ]


def test_delivery_works_where_folders_cannot_be_opened_as_on_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows refuses os.open on a folder (PermissionError): the LoRA is still delivered, only the folder's fsync
    is skipped."""
    job = _job(tmp_path)
    data = _write_lora(job.folder / "output" / "mydog.safetensors")
    real_open = os.open
    refused: list[str] = []

    def windows_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path).is_dir():
            refused.append(str(path))
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", windows_open)
    paths = deliver(job, tmp_path / "Lora")
    assert refused and paths[0].read_bytes() == data


def test_sdxl_job_and_no_sample(tmp_path: Path) -> None:
    job = _job(tmp_path, fm_type="sd_xl", name="xl")
    _write_lora(job.folder / "output" / "xl.safetensors")
    paths = deliver(job, tmp_path / "Lora")
    assert [p.name for p in paths] == ["xl.safetensors", "xl.json"]
    assert json.loads(paths[1].read_text(encoding="utf-8"))["sd version"] == "SDXL"


def test_existing_names_are_never_overwritten(tmp_path: Path) -> None:
    job = _job(tmp_path)
    data = _write_lora(job.folder / "output" / "mydog.safetensors")
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    (lora_dir / "mydog.safetensors").write_bytes(b"someone else's LoRA")
    (lora_dir / "mydog-1.json").write_text("{}", encoding="utf-8")  # an orphan sidecar also blocks the name

    first = deliver(job, lora_dir)
    second = deliver(job, lora_dir)

    assert (lora_dir / "mydog.safetensors").read_bytes() == b"someone else's LoRA"
    assert (lora_dir / "mydog-1.json").read_text(encoding="utf-8") == "{}"
    assert [p.name for p in first] == ["mydog-2.safetensors", "mydog-2.json"]
    assert [p.name for p in second] == ["mydog-3.safetensors", "mydog-3.json"]
    assert (lora_dir / "mydog-3.safetensors").read_bytes() == data


def test_intermediate_epochs_only_with_keep_epochs(tmp_path: Path) -> None:
    job = _job(tmp_path)
    out = job.folder / "output"
    _write_lora(out / "mydog.safetensors")
    first = _write_lora(out / "mydog-000001.safetensors", seed=1)
    step = _write_lora(out / "mydog-step00000010.safetensors", seed=2)
    _write_lora(out / "other-000001.safetensors", seed=3)  # not this job's output name: ignored

    plain = deliver(job, tmp_path / "plain")
    assert [p.name for p in plain] == ["mydog.safetensors", "mydog.json"]
    assert not (tmp_path / "plain" / "mydog-epochs").exists()

    kept = deliver(job, tmp_path / "kept", keep_epochs=True)
    epochs = tmp_path / "kept" / "mydog-epochs"
    assert kept[2:] == [epochs / "mydog-000001.safetensors", epochs / "mydog-step00000010.safetensors"]
    assert (epochs / "mydog-000001.safetensors").read_bytes() == first
    assert (epochs / "mydog-step00000010.safetensors").read_bytes() == step


def test_final_lora_follows_result_json(tmp_path: Path) -> None:
    job = _job(tmp_path)
    elsewhere = job.folder / "output" / "renamed.safetensors"
    _write_lora(elsewhere)
    (job.folder / "result.json").write_text(json.dumps({"status": "completed", "output": str(elsewhere)}))
    assert final_lora(job) == elsewhere


def test_missing_or_damaged_lora_is_a_training_error(tmp_path: Path) -> None:
    job = _job(tmp_path)
    with pytest.raises(TrainingError, match=r"mydog\.safetensors does not exist"):
        deliver(job, tmp_path / "Lora")
    broken = job.folder / "output" / "mydog.safetensors"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(TrainingError, match="cannot be read"):
        deliver(job, tmp_path / "Lora")
    assert not (tmp_path / "Lora").exists() or not any((tmp_path / "Lora").iterdir())


class _DiskFull:
    """A writer that writes for real until its `fail_at`-th call, which raises ENOSPC as a full disk would."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self, handle: IO[bytes], data: bytes) -> object:
        self.calls += 1
        if self.calls == self.fail_at:
            handle.write(data[: len(data) // 2])  # part of the chunk made it, as on a real full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return handle.write(data)


def _full_delivery_job(tmp_path: Path) -> Job:
    job = _job(tmp_path)
    out = job.folder / "output"
    _write_lora(out / "mydog.safetensors", megabytes=2.5 * CHUNK_BYTES / (1 << 20))  # three chunks
    _write_lora(out / "mydog-000001.safetensors", seed=1)
    _sample(out / "sample", "mydog_e000001_00.png", (0, 255, 0), 1_000)
    return job


def test_every_write_is_counted(tmp_path: Path) -> None:
    job = _full_delivery_job(tmp_path)
    writer = _DiskFull(None)
    paths = deliver(job, tmp_path / "Lora", keep_epochs=True, write=writer)
    # LoRA (3 chunks), sidecar, preview, one epoch file
    assert writer.calls == 6
    assert len(paths) == 4


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 5, 6])
def test_disk_full_at_any_write_leaves_the_lora_folder_as_it_was(tmp_path: Path, fail_at: int) -> None:
    job = _full_delivery_job(tmp_path)
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    (lora_dir / "mydog.safetensors").write_bytes(b"older LoRA")
    (lora_dir / "other.safetensors").write_bytes(b"unrelated")
    before = _listing(lora_dir)

    with pytest.raises(TrainingError) as caught:
        deliver(job, lora_dir, keep_epochs=True, write=_DiskFull(fail_at))

    assert "No space left on device" in caught.value.message
    assert "kept at" in (caught.value.hint or "")
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    assert _listing(lora_dir) == before
    assert sorted(p.name for p in lora_dir.iterdir()) == ["mydog.safetensors", "other.safetensors"]
    # the job's own files are untouched, so delivery can be tried again
    assert (job.folder / "output" / "mydog.safetensors").stat().st_size > 2 * CHUNK_BYTES
    assert [p.name for p in deliver(job, lora_dir)] == [
        "mydog-1.safetensors",
        "mydog-1.json",
        "mydog-1.preview.png",
    ]


def test_activation_text_from_class_tokens_and_top_tags() -> None:
    md = {"ss_tag_frequency": json.dumps({"1_ohwx": {"ohwx": 5, "smile": 4, "hat": 4, "tree": 1}})}
    assert activation_text(md) == "ohwx, smile, hat, tree"
    assert activation_text(md, top_tags=1) == "ohwx, smile"
    # folders without a <repeats>_ prefix carry no class token; only tags then
    assert activation_text({"ss_tag_frequency": json.dumps({"images": {"a": 1, "b": 3}})}) == "b, a"
    assert activation_text({}) == ""
    assert activation_text({"ss_tag_frequency": "not json"}) == ""


def test_sidecar_version_falls_back_to_metadata(tmp_path: Path) -> None:
    job = _job(tmp_path)
    odd = Job(**{**job.__dict__, "fm_type": "unknown"})
    assert sidecar(odd, {"ss_base_model_version": "sdxl_base_v1-0"})["sd version"] == "SDXL"
    assert sidecar(odd, {})["sd version"] == "SD1"
    assert sidecar(job, {}, preferred_weight=0.8)["preferred weight"] == 0.8
