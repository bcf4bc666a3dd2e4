"""The REST API on both lines (fastapi 0.94 / pydantic 1 and fastapi 0.104 / pydantic 2), without torch.

The scheduler thread is not started here (training needs torch, which the Forge-line venv lacks): these tests
cover the request models, validation, error mapping, auth, listings and the queue operations over real HTTP.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import threading
import time
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
from home_support import SD15_KEYS
from PIL import Image
from safetensors.numpy import save_file
from server_support import running, stranger

from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import build_service, create_app

TOKEN = "forge-line-token"
SDXL_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "conditioner.embedders.0.transformer.text_model.x",
    "conditioner.embedders.1.model.x",
)
CONFIG = 'output_name = "{name}"\nresolution = "64,64"\nnetwork_dim = 4\nmax_train_steps = 2\nmixed_precision = "no"\n'


def _torch_style_ckpt(path: Path, keys: tuple[str, ...]) -> None:
    """A zip-format .ckpt as torch.save writes it (data.pkl naming torch._utils._rebuild_tensor_v2 and
    torch.FloatStorage, storages as persistent ids), made without torch: the pure-Python pickler writes the
    globals' names as torch would."""

    def rebuild(*args: object) -> None:
        return None

    class Storage:
        pass

    class Tensor:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (rebuild, (Storage(), 0, (2, 2), (2, 1), False, {}))

    def save_rebuild(pickler: Any, obj: object) -> None:
        pickler.write(pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n")
        pickler.memoize(obj)

    def save_storage_type(pickler: Any, obj: object) -> None:
        pickler.write(pickle.GLOBAL + b"torch\nFloatStorage\n")
        pickler.memoize(obj)

    class Writer(pickle._Pickler):  # type: ignore[misc,name-defined]
        dispatch: ClassVar[dict[type, object]] = {
            **pickle._Pickler.dispatch,  # type: ignore[attr-defined]
            types.FunctionType: save_rebuild,
            type: save_storage_type,
        }

        def persistent_id(self, obj: object) -> object:
            return ("storage", Storage, "0", "cpu", 4) if isinstance(obj, Storage) else None

    buffer = io.BytesIO()
    Writer(buffer, protocol=2).dump({"state_dict": {key: Tensor() for key in keys}, "global_step": 10})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", bytes(16))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


def _checkpoint(path: Path, keys: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: np.zeros((2, 2), dtype=np.float16) for key in keys}, str(path))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("home")
    _checkpoint(root / "models" / "sd15.safetensors", SD15_KEYS)
    _checkpoint(root / "models" / "xl" / "sdxl.safetensors", SDXL_KEYS)
    _checkpoint(root / "models" / "a_lora.safetensors", ("lora_unet_x.lora_down.weight",))
    _torch_style_ckpt(root / "models" / "old.ckpt", SD15_KEYS)
    folder = root / "datasets" / "cats" / "5_cat"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 60, 10, 10)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a cat, photo {i}\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def client(home: Path) -> Iterator[httpx.Client]:
    service = build_service(home)
    with running(create_app(service, token=TOKEN)) as base:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=base + API_PREFIX, headers=headers, timeout=30) as http:
            yield http


def _training(name: str, model: str = "sd15.safetensors", **params: str) -> dict[str, object]:
    training_params = {
        "training_instance_type": "local",
        "model": model,
        "dataset": "cats",
        "fm_type": "sd_1_5",
    }
    return {"training_params": {**training_params, **params}, "config_params": CONFIG.format(name=name)}


def test_serving_the_api_imports_no_torch(home: Path) -> None:
    code = (
        "import sys, pathlib\n"
        "from kohya_backend.service.app import build_service, create_app\n"
        "from kohya_backend.train.plan import format_with_plan\n"
        "service = build_service(pathlib.Path(sys.argv[1]))\n"
        "create_app(service)\n"
        "assert service.home.list_models() and service.home.list_datasets()\n"
        "format_with_plan('network_dim = 8', 'sd_xl', require_paths=False)\n"
        "service.instance_types()\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(home)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_auth_version_and_openapi(client: httpx.Client) -> None:
    base = str(client.base_url).rstrip("/")
    assert httpx.get(f"{base}/version").json()["api"] == "1.0"
    with stranger() as other:  # another client: its refusals back off that one, not `client`
        assert other.get(f"{base}/models").status_code == 401
        assert other.get(f"{base}/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # Refused before any body is read: a client without the token gets 401, never a validation answer.
        assert other.post(f"{base}/trainings", content=b"{not json" * 1000).status_code == 401
        assert other.post(f"{base}/config/format", json={"fm_type": 1}).status_code == 401
    spec = httpx.get(f"{base}/openapi.json").json()  # the schema stays readable without the token
    assert f"{API_PREFIX}/trainings" in spec["paths"]
    # One token check (the middleware), not a second per route: no operation documents an Authorization parameter.
    parameters = [
        p for path in spec["paths"].values() for op in path.values() for p in op.get("parameters", [])
    ]
    assert parameters and not [p for p in parameters if p["name"].lower() == "authorization"]


def test_listings(client: httpx.Client) -> None:
    listing = client.get("/models").json()
    assert listing["roots"] == [listing["root"]]  # one models root here; the WebUI may add --ckpt-dir's
    models = {m["name"]: m for m in listing["models"]}
    assert models["sd15.safetensors"]["family"] == "sd_1_5"
    assert models["xl/sdxl.safetensors"]["family"] == "sd_xl"
    assert models["a_lora.safetensors"]["family"] == "unknown"
    assert models["old.ckpt"]["family"] == "sd_1_5" and models["old.ckpt"]["error"] is None  # no torch needed
    (cats,) = client.get("/datasets").json()["datasets"]
    assert cats["name"] == "cats" and cats["summary"]["images"] == 3
    (local,) = client.get("/instance-types").json()["instance_types"]
    assert local["name"] == "local" and "CPU" in local["label"]


def test_format_reports_issues_with_lines_and_returns_a_plan(client: httpx.Client) -> None:
    bad = client.post(
        "/config/format", json={"fm_type": "sd_1_5", "config_params": "network_dim = 8\nlearnig_rate = 1\n"}
    )
    assert bad.status_code == 400
    (issue,) = bad.json()["detail"]["issues"]
    assert issue["line"] == 2 and "learning_rate" in (issue["hint"] or "") + issue["message"]
    good = client.post(
        "/config/format",
        json={
            "fm_type": "sd_xl",
            "config_params": {"network_dim": 8, "train_data_dir": "cats", "max_train_epochs": 2},
        },
    )
    assert good.status_code == 200, good.text
    body = good.json()
    assert "network_dim = 8" in body["toml"] and body["plan"]["total_steps"] > 0


def test_queue_operations(client: httpx.Client) -> None:
    created = client.post("/trainings", json=_training("first"))
    assert created.status_code == 201, created.text
    job = created.json()["job"]
    assert job["status"] == "queued" and job["plan"]["total_steps"] == 2
    assert client.post("/trainings", json=_training("first")).status_code == 409
    page = client.get("/trainings", params={"status": "queued", "limit": 1}).json()
    assert page["total"] >= 1 and len(page["jobs"]) == 1
    assert client.post(f"/trainings/{job['id']}/cancel").json()["job"]["status"] == "cancelled"
    assert client.post(f"/trainings/{job['id']}/cancel").status_code == 409
    assert client.delete(f"/trainings/{job['id']}").status_code == 204
    assert client.get(f"/trainings/{job['id']}").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (_training("m", model="nope.safetensors"), 404, "does not exist"),
        (_training("m", model="xl/sdxl.safetensors"), 400, "SDXL"),
        (_training("m", model="../../etc/passwd"), 400, ".."),
        (_training("m", dataset="dogs"), 404, "dataset"),
        (_training("m", training_instance_type="mars"), 400, "instance type"),
    ],
)
def test_bad_submissions_are_refused_with_a_reason(
    client: httpx.Client, body: dict[str, object], status: int, needle: str
) -> None:
    answer = client.post("/trainings", json=body)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert needle in detail["message"] + (detail["hint"] or "")


def test_malformed_bodies_and_ids(client: httpx.Client) -> None:
    assert client.post("/trainings", json={"config_params": ""}).status_code == 422
    assert client.post("/config/format", json={"fm_type": "sd_1_5"}).status_code == 422
    assert client.get("/trainings/not-an-id").status_code == 400
    assert client.get("/trainings/20200101-000000-abcdef/logs").status_code == 404
    outside = {**_training("p"), "config_params": 'network_weights = "/etc/hosts"\n'}
    assert client.post("/trainings", json=outside).status_code == 400


def test_waiting_followers_hold_no_worker_threads(client: httpx.Client) -> None:
    """60 long-polls on a queued job wait 4 s each; meanwhile plain requests still get answers at once.

    The server's thread pool has 40 threads: followers that each held one would leave none for other requests
    until they timed out, so the other requests would finish after them.
    """
    job = client.post("/trainings", json=_training("followed")).json()["job"]
    finished: list[str] = []
    lock = threading.Lock()

    def follow() -> None:
        answer = client.get(f"/trainings/{job['id']}/events", params={"after": 0, "timeout": 4})
        assert answer.status_code == 200 and answer.json()["events"] == []
        with lock:
            finished.append("follower")

    followers = [threading.Thread(target=follow) for _ in range(60)]
    for thread in followers:
        thread.start()
    time.sleep(1.0)  # let them all reach their wait
    assert client.get("/trainings", params={"limit": 1}).status_code == 200
    assert client.get("/models").status_code == 200
    with lock:
        finished.append("others")
    for thread in followers:
        thread.join(30)
    assert finished[0] == "others" and finished.count("follower") == 60
    client.post(f"/trainings/{job['id']}/cancel")
