"""The dataset routes over real HTTP (uvicorn on 127.0.0.1), on pydantic 1 and 2: multipart create, show, images,
captions, deletes, auth and the error mapping."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from server_support import running, stranger

from kohya_backend.errors import TrainManagementError
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service, create_app
from kohya_backend.service.datasets import check_health_resolution

TOKEN = "dataset-token"


def _png(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def client(home: Path) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with (
        running(create_app(build_service(home), token=TOKEN)) as base,
        httpx.Client(base_url=f"{base}{API_PREFIX}", headers=headers, timeout=30) as http,
    ):
        yield http


def _create(client: httpx.Client, name: str, files: list[tuple[str, bytes]], **form: str) -> httpx.Response:
    return client.post(
        "/datasets",
        data={"name": name, **form},
        files=[("files", (file_name, data, "application/octet-stream")) for file_name, data in files],
    )


def test_create_with_relative_paths_show_and_list(client: httpx.Client, home: Path) -> None:
    answer = _create(
        client,
        "cats",
        [
            ("myfolder/4_cat/a.png", _png()),
            ("myfolder/4_cat/a.txt", b"a cat"),
            ("b.png", _png()),
            ("x.exe", b"MZ"),
        ],
        repeats="3",
        subject="kitty",
    )
    assert answer.status_code == 201, answer.text
    dataset = answer.json()["dataset"]
    assert sorted(dataset["images"]) == ["3_kitty/b.png", "4_cat/a.png"]
    assert dataset["skipped"][0]["file"] == "x.exe"
    assert (home / "datasets/cats/4_cat/a.txt").read_text() == "a cat"
    shown = client.get("/datasets/cats").json()["dataset"]
    assert {i["image"]: i["caption"] for i in shown["images"]} == {
        "3_kitty/b.png": None,
        "4_cat/a.png": "a cat",
    }
    assert shown["report"]["ok"] and shown["report"]["train_items"] == 7
    listed = client.get("/datasets").json()["datasets"]
    assert [d["name"] for d in listed] == ["cats"]


def test_create_from_zip_with_preprocessing(client: httpx.Client, home: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("2_dog/d.png", _png(size=(900, 600)))
        archive.writestr("2_dog/d.txt", "a dog")
    answer = _create(client, "dogs", [("dogs.zip", buffer.getvalue())], preprocess="512-bucket")
    assert answer.status_code == 201, answer.text
    image = client.get("/datasets/dogs/images/2_dog/d.png")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.headers["x-content-type-options"] == "nosniff"
    with Image.open(io.BytesIO(image.content)) as decoded:
        assert decoded.size == (640, 384)  # the trainer's bucket for 900x600 at 512


def test_captions_round_trip_and_report(client: httpx.Client) -> None:
    assert client.get("/datasets/cats/captions/3_kitty/b.png").json() == {
        "image": "3_kitty/b.png",
        "caption": "",
    }
    put = client.put("/datasets/cats/captions/3_kitty/b.png", json={"caption": "a kitty, sleeping"})
    assert put.status_code == 200 and put.json()["caption"] == "a kitty, sleeping"
    assert client.get("/datasets/cats/captions/3_kitty/b.png").json()["caption"] == "a kitty, sleeping"
    report = client.get("/datasets/cats/report").json()["report"]
    assert report["ok"] and report["warnings"] == []


def test_errors_are_mapped_and_paths_stay_inside(client: httpx.Client, home: Path) -> None:
    (home / "secret.png").write_bytes(_png())
    again = _create(client, "cats", [("c.png", _png())])
    assert again.status_code == 409 and again.json()["detail"]["error"] == "DatasetExists"
    bad = _create(client, "new", [("c.png", _png())], repeats="0")
    assert bad.status_code == 400 and "repeats" in bad.json()["detail"]["message"]
    evil = _create(client, "evil", [("../../evil.png", _png())])
    assert evil.status_code == 400 and "'..'" in evil.json()["detail"]["message"]
    assert client.get("/datasets/missing").status_code == 404
    assert client.get("/datasets/cats/images/4_cat/nope.png").status_code == 404
    assert client.get("/datasets/cats/images/4_cat/a.txt").status_code == 404
    escape = client.get("/datasets/cats/images/%2E%2E/%2E%2E/secret.png")
    assert escape.status_code == 400 and "'..'" in escape.json()["detail"]["message"]
    outside = client.put("/datasets/cats/captions/..%2F..%2Fsecret.png", json={"caption": "x"})
    assert outside.status_code == 400 and not (home / "secret.txt").exists()
    (home / "datasets/cats/4_cat/link.png").symlink_to(home / "secret.png")
    linked = client.get("/datasets/cats/images/4_cat/link.png")
    assert linked.status_code == 400 and linked.json()["detail"]["error"] == "PathOutsideHome"
    (home / "datasets/cats/4_cat/link.png").unlink()
    assert not (home / "datasets/evil").exists() and not (home / "datasets/new").exists()


def test_health_report(client: httpx.Client) -> None:
    created = _create(
        client,
        "twins",
        [("1_twin/a.png", _png(size=(400, 300))), ("1_twin/b.png", _png(size=(400, 300))),
         ("1_twin/a.txt", b"twin, red"), ("1_twin/c.png", _png((0, 0, 200), (300, 400)))],
    )  # fmt: skip
    assert created.status_code == 201, created.text
    answer = client.get("/datasets/twins/health", params={"resolution": 512})
    assert answer.status_code == 200, answer.text
    health = answer.json()["health"]
    assert health["name"] == "twins" and health["images"] == 3
    assert health["duplicates"]["identical"] == [["1_twin/a.png", "1_twin/b.png"]]
    assert health["captions"]["missing_files"] == ["1_twin/b.png", "1_twin/c.png"]
    assert health["tags"]["most_common"] == [{"tag": "red", "images": 1}, {"tag": "twin", "images": 1}]
    assert (health["aspect_ratios"]["portrait"], health["aspect_ratios"]["landscape"]) == (1, 2)
    bad = client.get("/datasets/twins/health", params={"resolution": 500})
    assert bad.status_code == 400 and "multiple of 64" in bad.json()["detail"]["hint"]
    assert client.get("/datasets/nothere/health").status_code == 404
    with stranger("127.0.0.3") as other:
        assert other.get(f"{str(client.base_url).rstrip('/')}/datasets/twins/health").status_code == 401


@pytest.mark.parametrize("resolution", [256, 512, 1024, 2048])
def test_a_health_report_is_made_for_multiples_of_64_from_256_to_2048(resolution: int) -> None:
    assert check_health_resolution(resolution) == resolution


@pytest.mark.parametrize("resolution", [True, 192, 500, 2112, 512.0, "512", None])
def test_other_health_resolutions_are_refused(resolution: object) -> None:
    with pytest.raises(TrainManagementError, match="is not a training resolution"):
        check_health_resolution(resolution)


def test_auth_is_required(client: httpx.Client) -> None:
    base = str(client.base_url).rstrip("/")
    with stranger() as other:  # another client: its refusals back off that one, not `client`
        assert other.get(f"{base}/datasets/cats").status_code == 401
        assert (
            other.post(
                f"{base}/datasets", data={"name": "x"}, files=[("files", ("a.png", _png()))]
            ).status_code
            == 401
        )
        assert other.delete(f"{base}/datasets/cats").status_code == 401


def test_delete_image_and_dataset(client: httpx.Client, home: Path) -> None:
    assert client.delete("/datasets/cats/images/4_cat/a.png").status_code == 204
    assert (
        not (home / "datasets/cats/4_cat/a.png").exists()
        and not (home / "datasets/cats/4_cat/a.txt").exists()
    )
    assert client.delete("/datasets/cats").status_code == 204
    assert not (home / "datasets/cats").exists()
    assert client.delete("/datasets/cats").status_code == 404


def test_a_dataset_in_use_answers_409_listing_the_jobs(client: httpx.Client, home: Path) -> None:
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x.weight"]
    save_file({k: np.zeros((1,), dtype=np.float32) for k in keys}, str(home / "models/sd15.safetensors"))
    created = _create(client, "busy", [("2_shape/a.png", _png((9, 9, 9), (64, 64))), ("2_shape/a.txt", b"a")])
    assert created.status_code == 201, created.text
    config = {"resolution": "64,64", "enable_bucket": False, "max_train_steps": 2, "mixed_precision": "no"}
    params = {"model": "sd15.safetensors", "dataset": "busy", "fm_type": "sd_1_5"}
    jobs = []
    for name in ("first", "second"):
        answer = client.post(
            "/trainings", json={"training_params": params, "config_params": {**config, "output_name": name}}
        )
        assert answer.status_code == 201, answer.text
        jobs.append(answer.json()["job"]["id"])
    refused = client.delete("/datasets/busy")
    detail = refused.json()["detail"]
    assert refused.status_code == 409 and detail["error"] == "DatasetInUse"
    assert sorted(detail["jobs"]) == sorted(jobs) and all(job in detail["message"] for job in jobs)
    caption = client.put("/datasets/busy/captions/2_shape/a.png", json={"caption": "b"})
    assert caption.status_code == 409 and sorted(caption.json()["detail"]["jobs"]) == sorted(jobs)
    for job in jobs:
        assert client.post(f"/trainings/{job}/cancel").status_code == 200
    assert client.delete("/datasets/busy").status_code == 204
