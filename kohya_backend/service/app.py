"""The API app: build_service (home, job store, scheduler) and create_app (FastAPI with the API router).

The one standalone server (tab, API and scheduler thread) is kohya_backend/ui/standalone.py's serve.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from kohya_backend.jobs.remote import RemoteRunner
from kohya_backend.jobs.s3_jobs import S3LocalRunner
from kohya_backend.jobs.sagemaker import SageMakerRunner
from kohya_backend.jobs.scheduler import DEFAULT_STALL_AFTER_S, Scheduler
from kohya_backend.jobs.store import Job, JobStore
from kohya_backend.service.api import API_PREFIX, create_router
from kohya_backend.service.auth import BearerTokenMiddleware
from kohya_backend.service.guard import GuardPolicy, JsonBodies, RequestGuard
from kohya_backend.service.home import Home
from kohya_backend.service.hosts import answered_hosts
from kohya_backend.service.login_limit import LoginLimiter, LoginThrottle
from kohya_backend.service.s3_assets import S3Assets
from kohya_backend.service.training import TrainingService

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7861
TOKEN_ENV = "TRAIN_MANAGEMENT_TOKEN"


def build_service(
    home_dir: Path,
    *,
    lora_dir: Path | None = None,
    models_dirs: Sequence[Path] | None = None,
    poll_interval_s: float = 1.0,
    restrict_paths: bool = True,
    python: Sequence[str] | None = None,
    devices: Mapping[str, int] | None = None,
    keep_epochs: bool = False,
    on_delivered: Callable[[Job, list[Path]], None] | None = None,
    before_local_start: Callable[[Job, str], None] | None = None,
    stall_after_s: float = DEFAULT_STALL_AFTER_S,
    s3_uri: str | None = None,
    sagemaker_role_arn: str | None = None,
    sagemaker_image_uri: str | None = None,
) -> TrainingService:
    """A home folder, its job store and a scheduler with the local runner, wrapped in a TrainingService.

    A host (the WebUI adapter) passes its folders, the interpreter that runs the trainer (`python`, default this
    one), the devices with their jobs-at-once, and its hooks; see Scheduler for `on_delivered`,
    `before_local_start` and `stall_after_s`. `s3_uri` is the S3 prefix whose models/ and datasets/ join the lists
    (default: the one in HOME/cloud.toml, if any); s3:// inputs of local jobs are fetched through HOME/s3-cache.
    SageMaker jobs run with `sagemaker_role_arn` and `sagemaker_image_uri` (default: HOME/cloud.toml's
    [sagemaker]) under that prefix.
    """
    home = Home(home_dir, lora_dir=lora_dir, models_dirs=models_dirs)
    s3 = S3Assets.for_home(home, s3_uri)
    store = JobStore(home.root)
    local = S3LocalRunner(
        python, access=s3.access, on_started=lambda job_id, run: store.set_process(job_id, run.pid, run.pgid)
    )
    sagemaker = SageMakerRunner.for_home(
        home.root,
        prefix=lambda: s3.prefix,
        s3=s3.access.client,
        role_arn=sagemaker_role_arn,
        image_uri=sagemaker_image_uri,
    )
    scheduler = Scheduler(
        store,
        [local, RemoteRunner.for_home(home.root), sagemaker],
        lora_dir=home.lora,
        devices=devices,
        poll_interval_s=poll_interval_s,
        keep_epochs=keep_epochs,
        on_delivered=on_delivered,
        before_local_start=before_local_start,
        stall_after_s=stall_after_s,
    )
    return TrainingService(home, scheduler, restrict_paths=restrict_paths, s3=s3)


def default_policy() -> GuardPolicy:
    """The guard of an app on 127.0.0.1 without configured origins: loopback names only, the API's bodies JSON."""
    return GuardPolicy(hosts=answered_hosts(DEFAULT_HOST), json_paths=(API_PREFIX,))


def create_app(
    service: TrainingService,
    *,
    token: str | None = None,
    policy: GuardPolicy | None = None,
    logins: LoginLimiter | None = None,
) -> FastAPI:
    """The standalone FastAPI app serving the API (OpenAPI at /docs); it does not start the scheduler.

    Outermost first: the request guard (Host, Origin; `policy`, default loopback only), CORS for the configured
    origins only, the login throttle when `logins` is given, the bearer token on the API (its refusals counted in
    `logins` too: the login's password is the same token), then JSON-only bodies.
    """
    app = FastAPI(
        title="Train Management",
        description="Train kohya-compatible LoRAs for SD 1.5 and SDXL",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
    )
    app.include_router(create_router(service))
    policy = policy or default_policy()
    app.add_middleware(JsonBodies, policy=policy)
    if token:
        open_paths = {f"{API_PREFIX}/{name}" for name in ("version", "openapi.json", "docs")}
        app.add_middleware(
            BearerTokenMiddleware,
            token=token,
            prefix=API_PREFIX,
            open_paths=frozenset(open_paths),
            limiter=logins or LoginLimiter(),  # one count per client for the login page and the API alike
        )
    if logins is not None:
        app.add_middleware(LoginThrottle, limiter=logins)
    # Added on every app, also without configured origins: a preflight then gets no Access-Control-Allow-Origin
    # here instead of reaching the mounted gradio app and its own permissive CORS.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(policy.origins),
        allow_origin_regex=policy.origin_regex,
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=True,
    )
    app.add_middleware(RequestGuard, policy=policy)
    return app
