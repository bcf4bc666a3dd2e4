"""Without a trainer's environment the WebUI says why, naming the real cause (--skip-install keeps install.py from
running), and this machine is listed as unavailable to train on; with one, it is ready. The stand-in WebUI."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "webui_stub"))
from stub_webui import running_webui

from kohya_backend.host.runtime import RUNTIME
from kohya_backend.service.api import API_PREFIX


@pytest.fixture(autouse=True)
def _no_trainer_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAIN_MANAGEMENT_TRAINER_ENV", str(tmp_path / "no-trainer-env"))
    monkeypatch.delenv("TRAIN_MANAGEMENT_PYTHON", raising=False)


def _local(url: str) -> dict[str, object]:
    entries = httpx.get(f"{url}{API_PREFIX}/instance-types", timeout=30).json()["instance_types"]
    return next(e for e in entries if e["name"] == "local")


def _failed_local_job_reason() -> str:
    assert RUNTIME.service is not None
    store = RUNTIME.service.store
    job = RUNTIME.service.scheduler.submit(
        fm_type="sd_1_5", model="m.safetensors", dataset="d", instance_type="local",
        output_name="early", config_toml="", params={},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not store.get(job.id).status.is_terminal:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return store.get(job.id).reason or ""


@pytest.mark.parametrize("skip_install", [True, False], ids=["skip-install", "install-failed"])
def test_without_a_trainer_this_machine_is_unavailable_and_the_real_cause_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], skip_install: bool
) -> None:
    argv = ["--skip-install"] if skip_install else []
    with running_webui(tmp_path / "webui", argv) as ui:
        printed = capsys.readouterr().err
        local = _local(ui.url)
        assert local["state"] == "unavailable" and "unavailable" in str(local["label"])
        reason = _failed_local_job_reason()
        for text in (printed, str(local["problem"]), reason):
            assert "not ready" in text and "--train-python" in text
            assert ("--skip-install" in text) is skip_install, text
            assert ("restart the WebUI with network access" in text) is not skip_install, text


def test_with_a_trainer_this_machine_is_ready(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_webui(tmp_path / "webui", ["--skip-install", "--train-python", sys.executable]) as ui:
        local = _local(ui.url)
        assert (
            local["state"] == "ready" and "unavailable" not in str(local["label"]) and "problem" not in local
        )
        assert "local training is unavailable" not in capsys.readouterr().err
