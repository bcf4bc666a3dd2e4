"""Shared test setup: offline hub, hashes kept out of the user's cache, and the fixtures many test files use (the demo
model and dataset, a home built on them, a scheduler factory).

Nothing heavy is imported at module level: tests/torchless runs in environments without torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kohya_backend.jobs.scheduler import Scheduler

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Trainers started by tests remember model hashes here, not in the user's cache folder.
os.environ.setdefault(
    "TRAIN_MANAGEMENT_HASH_CACHE", os.path.join(tempfile.mkdtemp(prefix="tm-hashes-"), "sha256.json")
)

DEMO_MODEL = "demo-sd_1_5.safetensors"
DEMO_PROMPT = "a demo picture --w 64 --h 64 --s 2 --d 1\n"


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo home (tiny SD 1.5 model, its tokenizer, 8 captioned images in datasets/demo, a 6-step config, and
    prompts.txt), generated once per test run. Read only: build a private home with `demo_home`."""
    from kohya_backend.assets.demo import prepare_demo

    root = tmp_path_factory.mktemp("demo-assets")
    prepare_demo(root, fm_type="sd_1_5", steps=6)
    (root / "prompts.txt").write_text(DEMO_PROMPT, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def demo_config(demo_assets: Path) -> str:
    """The demo's config TOML (6 steps) with the shared assets' paths."""
    return (demo_assets / "demo-sd_1_5.toml").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def make_demo_home(demo_assets: Path) -> Callable[..., Path]:
    """A factory: `make_demo_home(root, steps=2)` makes `root` a home of its own with the demo's models and
    datasets (hard links, so adding or removing files there never touches the shared assets) and its config."""
    from kohya_backend.assets.demo import demo_config

    def make(root: Path, *, steps: int = 2) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        for name in ("models", "datasets"):
            shutil.copytree(demo_assets / name, root / name, copy_function=_link_or_copy)
        shutil.copy(demo_assets / "prompts.txt", root / "prompts.txt")
        (root / "demo-sd_1_5.toml").write_text(
            demo_config(root, fm_type="sd_1_5", steps=steps), encoding="utf-8"
        )
        return root

    return make


def _link_or_copy(source: str, target: str) -> Any:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


@pytest.fixture
def demo_home(tmp_path: Path, make_demo_home: Callable[..., Path]) -> Path:
    """A fresh home for one test with the demo model, dataset and a 2-step config."""
    return make_demo_home(tmp_path / "home")


@pytest.fixture
def make_scheduler() -> Iterator[Callable[..., Scheduler]]:
    """A factory of schedulers over a home's job store with the local runner (one CPU slot, 0.1 s polls unless
    told otherwise); every scheduler it made is stopped afterwards."""
    from kohya_backend.jobs.runner import LocalRunner
    from kohya_backend.jobs.scheduler import Scheduler
    from kohya_backend.jobs.store import JobStore

    made: list[Scheduler] = []

    def make(home: Path, **kwargs: Any) -> Scheduler:
        kwargs.setdefault("devices", {"cpu": 1})
        kwargs.setdefault("poll_interval_s", 0.1)
        scheduler = Scheduler(JobStore(home), [LocalRunner()], **kwargs)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.stop()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The demo's tiny SD 1.5 and SDXL checkpoints, its tokenizer and a 64 px captioned dataset, written once."""
    from kohya_backend.assets.checkpoints import write_checkpoint
    from kohya_backend.assets.dataset import write_demo_dataset
    from kohya_backend.assets.tokenizer import write_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny-assets")
    write_tiny_tokenizer(root / "tokenizer")
    return {
        "sd_1_5": write_checkpoint(root / "sd15.safetensors", "sd_1_5", size="tiny", seed=0),
        "sd_xl": write_checkpoint(root / "sdxl.safetensors", "sd_xl", size="tiny", seed=0),
        "tokenizer": root / "tokenizer",
        "data": write_demo_dataset(root / "data", count=4, size=(64, 64)),
    }
