"""The standalone app: the tab at `/` and the REST API under its prefix on one FastAPI app, with the scheduler.

`--demo` fills an empty home with the bundled tiny model, tokenizer and dataset, and pre-fills the tab with a
config that trains them in seconds on a CPU. With a token (required off loopback) the API wants the bearer token
and the tab shows gradio's login page (any user name, the token as password).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    TOKEN_ENV,
    _is_loopback,
    build_service,
    create_app,
)
from kohya_backend.service.datasets import DatasetService
from kohya_backend.service.home import Home
from kohya_backend.service.training import TrainingService
from kohya_backend.ui.hooks import UiHooks

DEMO_PROMPTS = "demo-sample-prompts.txt"
QUEUE_WORKERS = 8
SHUTDOWN_GRACE_S = 3
_STYLE = Path(__file__).resolve().parents[2] / "style.css"


def demo_config(fm_type: str, *, prompts: Path | None = None) -> str:
    """A config_params that trains the demo model on the demo dataset in seconds on a CPU (64 px, 30 steps)."""
    lines = [
        f"# Demo ({fm_type}): trains the bundled tiny model on a CPU in seconds; the real defaults are one",
        "# press of 'Load FM Type defaults' away. Model, dataset and output folder come from the fields above.",
        'tokenizer_cache_dir = "tokenizer"',
        'caption_extension = ".txt"',
        'resolution = "64,64"',
        "enable_bucket = false",
        "train_batch_size = 2",
        "max_train_steps = 30",
        "network_dim = 4",
        "network_alpha = 4",
        'optimizer_type = "AdamW"',
        "unet_lr = 1e-3",
        "text_encoder_lr = 1e-4",
        'lr_scheduler = "constant"',
        'mixed_precision = "no"',
        'save_precision = "fp16"',
        "seed = 1",
    ]
    if prompts is not None:
        lines += [f'sample_prompts = "{prompts.as_posix()}"', "sample_every_n_steps = 15"]
    return "\n".join(lines) + "\n"


def prepare_demo_home(home: Home) -> bool:
    """Write the demo model, tokenizer, dataset and sample prompts when the home lacks models or datasets."""
    prompts = home.models / DEMO_PROMPTS
    if not prompts.exists():
        prompts.write_text("a red circle, blue background --w 64 --h 64 --s 8 --d 1\n", encoding="utf-8")
    if home.model_names() and home.dataset_names():  # names only: no checkpoint read, no dataset scanned
        return False
    from kohya_backend.assets.demo import prepare_demo  # imports torch: only for --demo

    prepare_demo(home.root, fm_type="sd_1_5")
    return True


def token_auth(token: str) -> Callable[[str, str], bool]:
    """gradio's login check: any user name, the token as password (compared in constant time)."""
    expected = token.encode("utf-8")

    def check(_user: str, password: str) -> bool:
        return hmac.compare_digest(str(password).encode("utf-8"), expected)

    return check


def enable_queue(blocks: Any) -> None:
    """gradio's queue, which `every=` polling needs on 3.41; a few workers so polls never wait on a format."""
    from kohya_backend.ui.compat import GRADIO_MAJOR

    if GRADIO_MAJOR < 4:
        blocks.queue(concurrency_count=QUEUE_WORKERS)
    else:
        blocks.queue(default_concurrency_limit=QUEUE_WORKERS)


def build_app(service: TrainingService, *, token: str | None = None, demo: bool = False) -> Any:
    """The FastAPI app: the REST API under its prefix and the tab's Blocks at `/` (scheduler not started)."""
    from kohya_backend.ui.compat import mount
    from kohya_backend.ui.tab import create_tab

    prompts = service.home.models / DEMO_PROMPTS
    hooks = UiHooks(
        default_config=(lambda fm: demo_config(fm, prompts=prompts if prompts.exists() else None))
        if demo
        else None
    )
    blocks = create_tab(service, DatasetService(service.home, jobs=service.store), hooks)
    if _STYLE.is_file():
        blocks.css = (blocks.css or "") + _STYLE.read_text(encoding="utf-8")
    enable_queue(blocks)
    app = create_app(service, token=token)
    return mount(app, blocks, "/", auth=token_auth(token) if token else None)


def serve(
    home_dir: Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    demo: bool = False,
    s3_uri: str | None = None,
    sagemaker_role_arn: str | None = None,
    sagemaker_image_uri: str | None = None,
) -> None:
    """Serve the tab and the API until interrupted, with the scheduler thread; off loopback only with a token."""
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None and not _is_loopback(host):
        raise TrainManagementError(
            f"refusing to serve on {host} without a token: anyone on the network could train and delete jobs",
            f"pass --token (or set {TOKEN_ENV}), or serve on 127.0.0.1",
        )
    service = build_service(
        home_dir,
        s3_uri=s3_uri,
        sagemaker_role_arn=sagemaker_role_arn,
        sagemaker_image_uri=sagemaker_image_uri,
    )
    if demo and prepare_demo_home(service.home):
        print(f"demo model and dataset written to {service.home.root}", flush=True)
    app = build_app(service, token=token, demo=demo)
    service.scheduler.start()
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}"
    print(f"Train Management on {url}/ (API {url}{API_PREFIX}, home {service.home.root})", flush=True)
    try:
        # gradio 3.41 keeps each `every=` poll as a background task that never ends: bound the graceful stop.
        uvicorn.run(
            app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S
        )
    finally:
        service.scheduler.stop()
