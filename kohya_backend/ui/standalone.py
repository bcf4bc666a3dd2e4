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
from kohya_backend.jobs.scheduler import DEFAULT_STALL_AFTER_S
from kohya_backend.service.api import API_PREFIX
from kohya_backend.service.app import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    TOKEN_ENV,
    build_service,
    create_app,
    default_policy,
)
from kohya_backend.service.auth import check_token
from kohya_backend.service.datasets import DatasetService
from kohya_backend.service.guard import GuardPolicy, configured_origins
from kohya_backend.service.home import Home
from kohya_backend.service.hosts import answered_hosts, is_loopback, proxy_options
from kohya_backend.service.login_limit import LoginLimiter
from kohya_backend.service.training import TrainingService
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.offline import OfflinePage

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


def without_gradio_cors(app: Any) -> None:
    """Take the CORS middleware out of every gradio app mounted on `app`: gradio 3.41 allows every origin and
    gradio 4 every localhost one, and a preflight for an API route that is not routed here reaches it. The app's
    own CORS (create_app) answers for the origins the user configured."""
    for route in app.routes:
        mounted: Any = getattr(route, "app", None)
        middleware = getattr(mounted, "user_middleware", None)
        if middleware is None:
            continue
        kept = [m for m in middleware if "CORS" not in getattr(m.cls, "__name__", "")]
        if len(kept) != len(middleware):
            mounted.user_middleware = kept
            mounted.middleware_stack = None  # rebuilt from the list on its first request


def build_app(
    service: TrainingService,
    *,
    token: str | None = None,
    demo: bool = False,
    policy: GuardPolicy | None = None,
    logins: LoginLimiter | None = None,
) -> Any:
    """The FastAPI app: the REST API under its prefix and the tab's Blocks at `/` (scheduler not started), behind
    the request guard of `policy` (default: loopback names, no other origin) and, with a token, a login page that
    backs off after failed attempts (`logins`, default a new LoginLimiter)."""
    from kohya_backend.ui.compat import mount
    from kohya_backend.ui.tab import create_tab

    policy = policy or default_policy()
    prompts = service.home.models / DEMO_PROMPTS
    hooks = UiHooks(
        default_config=(lambda fm: demo_config(fm, prompts=prompts if prompts.exists() else None))
        if demo
        else None,
        load_script=True,
        origins=policy,  # the request guard checks every route first; the tab's own check agrees with it
    )
    blocks = create_tab(service, DatasetService(service.home, jobs=service.store), hooks)
    if _STYLE.is_file():
        blocks.css = (blocks.css or "") + _STYLE.read_text(encoding="utf-8")
    enable_queue(blocks)
    if token:
        logins = logins or LoginLimiter()
    app = create_app(service, token=token, policy=policy, logins=logins if token else None)
    app.add_middleware(OfflinePage)  # the page asks no other host for anything (iframe-resizer, font hosts)
    app = mount(app, blocks, "/", auth=token_auth(token) if token else None)
    without_gradio_cors(app)
    return app


def serve_policy(
    host: str,
    *,
    allowed_hosts: tuple[str, ...] = (),
    cors_allow_origins: tuple[str, ...] = (),
    cors_allow_origins_regex: str | None = None,
) -> GuardPolicy:
    """The request guard of `serve`: the names it answers to on `host` (plus `allowed_hosts`), the origins besides
    its own that may use it, and JSON bodies on the API."""
    names = tuple(n.strip() for item in allowed_hosts for n in item.split(",") if n.strip())
    return GuardPolicy(
        hosts=answered_hosts(host, names),
        origins=configured_origins(cors_allow_origins, where="--cors-allow-origins"),
        origin_regex=cors_allow_origins_regex or None,
        json_paths=(API_PREFIX,),
    )


def serve(
    home_dir: Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    demo: bool = False,
    policy: GuardPolicy | None = None,
    stall_after_s: float = DEFAULT_STALL_AFTER_S,
    s3_uri: str | None = None,
    sagemaker_role_arn: str | None = None,
    sagemaker_image_uri: str | None = None,
    forwarded_allow_ips: str | None = None,
) -> None:
    """Serve the tab and the API until interrupted, with the scheduler thread; off loopback only with a token of
    at least 16 characters, and with any Host name (--allowed-hosts '*') only with a token. A client's address
    comes from X-Forwarded-For only when it is sent by a proxy in `forwarded_allow_ips`."""
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host):
        if token is None:
            raise TrainManagementError(
                f"refusing to serve on {host} without a token: anyone on the network could train and delete jobs",
                f"pass --token (or set {TOKEN_ENV}), or serve on 127.0.0.1",
            )
        check_token(token, f"the token (--token or {TOKEN_ENV}) of a server on {host}")
    policy = policy or serve_policy(host)
    if policy.hosts is None and token is None:
        raise TrainManagementError(
            "refusing --allowed-hosts '*' without a token: answering to any host name lets any website reach "
            "this app in your browser through a name of its own that resolves to this machine (DNS rebinding), "
            "and its pages then count as the app's own",
            f"name the host names instead (--allowed-hosts proxy.example,box.lan), or pass --token (or set "
            f"{TOKEN_ENV})",
        )
    if "*" in policy.origins:
        print("warning: --cors-allow-origins '*' lets every website use this app in your browser", flush=True)
    service = build_service(
        home_dir,
        stall_after_s=stall_after_s,
        s3_uri=s3_uri,
        sagemaker_role_arn=sagemaker_role_arn,
        sagemaker_image_uri=sagemaker_image_uri,
    )
    if demo and prepare_demo_home(service.home):
        print(f"demo model and dataset written to {service.home.root}", flush=True)
    app = build_app(service, token=token, demo=demo, policy=policy)
    service.scheduler.start()
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}"
    print(f"Train Management on {url}/ (API {url}{API_PREFIX}, home {service.home.root})", flush=True)
    try:
        # gradio 3.41 keeps each `every=` poll as a background task that never ends: bound the graceful stop.
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            **proxy_options(forwarded_allow_ips),
        )
    finally:
        service.scheduler.stop()
