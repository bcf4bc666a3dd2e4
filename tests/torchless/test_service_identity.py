"""A dataset (and a model) is the same one however a client spells it: jobs store canonical names, and a dataset a
queued job reads cannot be changed or deleted under it by any other name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from home_support import SD15_KEYS
from PIL import Image
from safetensors.numpy import save_file

from kohya_backend.service.app import build_service
from kohya_backend.service.datasets import DatasetInUse, DatasetService
from kohya_backend.service.home import PathOutsideHome
from kohya_backend.service.training import Submission, TrainingService

CONFIG = {"resolution": "64,64", "max_train_steps": 2, "mixed_precision": "no"}


def _dataset(root: Path, name: str) -> None:
    folder = root / name / "5_cat"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 90, 10, 10)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a cat", encoding="utf-8")


@pytest.fixture
def service(tmp_path: Path) -> TrainingService:
    service = build_service(tmp_path / "home")
    save_file(
        {k: np.zeros((2, 2), np.float16) for k in SD15_KEYS}, str(service.home.models / "sd15.safetensors")
    )
    for name in ("victim", "victim2", "other"):
        _dataset(service.home.datasets, name)
    os.symlink(service.home.datasets / "victim", service.home.datasets / "alias")
    return service


def _submit(service: TrainingService, dataset: str, model: str = "sd15.safetensors", **config: str) -> str:
    sub = Submission(model=model, dataset=dataset, fm_type="sd_1_5", config_params={**CONFIG, **config})
    return service.submit(sub).id


@pytest.mark.parametrize(
    "spelling", ["./victim", "victim/", "victim//", "{datasets}/victim", "other/../victim"]
)
def test_jobs_store_the_canonical_dataset_and_model_names(service: TrainingService, spelling: str) -> None:
    datasets = service.home.datasets
    if ".." in spelling:
        with pytest.raises(PathOutsideHome, match=r"'\.\.'"):
            _submit(service, spelling)
        return
    job = service.store.get(_submit(service, spelling.format(datasets=datasets)))
    assert job.dataset == "victim"
    job = service.store.get(_submit(service, "victim", model=f"./{'sd15.safetensors'}"))
    assert job.model == "sd15.safetensors"
    absolute = service.store.get(
        _submit(service, "victim", model=str(service.home.models / "sd15.safetensors"))
    )
    assert absolute.model == "sd15.safetensors"


def test_the_datasets_folder_itself_is_not_a_dataset(service: TrainingService) -> None:
    for spelling in (".", "./", str(service.home.datasets)):
        with pytest.raises(PathOutsideHome, match="datasets folder itself"):
            _submit(service, spelling)


@pytest.mark.parametrize(
    ("dataset", "config"),
    [
        ("./victim", {}),
        ("victim/", {}),
        ("{datasets}/victim", {}),
        ("alias", {}),  # a symlink to it: the same folder
        ("other", {"reg_data_dir": "victim"}),  # its regularisation images
        ("other", {"reg_data_dir": "alias"}),
    ],
)
def test_a_dataset_a_queued_job_reads_is_in_use_by_any_name(
    service: TrainingService, dataset: str, config: dict[str, str]
) -> None:
    datasets = DatasetService(service.home, jobs=service.store)
    job = _submit(service, dataset.format(datasets=service.home.datasets), **config)
    image = "5_cat/0.png"
    for action in (
        lambda: datasets.delete("victim"),
        lambda: datasets.delete("alias"),
        lambda: datasets.delete_image("victim", image),
        lambda: datasets.write_caption("victim", image, "changed"),
    ):
        with pytest.raises(DatasetInUse, match=job):
            action()
    assert (service.home.datasets / "victim" / image).is_file()
    datasets.delete("victim2")  # a similar name is another dataset
    assert not (service.home.datasets / "victim2").exists()
    service.cancel(job)
    datasets.delete("alias")  # the link goes, the folder stays
    datasets.delete("victim")
    assert not (service.home.datasets / "victim").exists()
