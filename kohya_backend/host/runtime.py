"""The extension's services for the life of the host process: built once, rebuilt only when the folders change.

The WebUI executes scripts/*.py again on every "Reload UI" (fresh module objects, callbacks cleared) but keeps
its process and sys.modules; this module is imported normally, so the one HostRuntime below outlives reloads and
the scheduler thread is started once per process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kohya_backend.jobs.store import Job
    from kohya_backend.service.datasets import DatasetService
    from kohya_backend.service.training import TrainingService

log = logging.getLogger(__name__)


def local_devices(gpus: Sequence[str], per_device: int) -> dict[str, int]:
    """Each GPU ('cuda:N', see kohya_backend.jobs.devices) with `per_device` jobs at once, or the CPU without one."""
    slots = max(1, int(per_device))
    return {device: slots for device in gpus} or {"cpu": slots}


def detected_gpus() -> tuple[str, ...]:
    """The scheduler names of this machine's visible GPUs (found without importing torch)."""
    from kohya_backend.jobs.devices import detect_gpus

    return tuple(gpu.device for gpu in detect_gpus())


@dataclass(frozen=True)
class HostConfig:
    """What the services are built from; a different value (e.g. another home folder) means a rebuild."""

    home: Path
    models_dirs: tuple[Path, ...]  # the checkpoint folders, in the WebUI's listing order (() = HOME/models)
    lora_dir: Path | None
    python: tuple[str, ...] | None
    gpus: tuple[str, ...] = ()
    per_device: int = 1
    keep_epochs: bool = False
    stall_after_s: float = 15 * 60.0
    s3_prefix: str = ""  # the WebUI's "S3 prefix" setting ('' : HOME/cloud.toml's, or none)
    sagemaker_role_arn: str = (
        ""  # the WebUI's SageMaker settings ('' : HOME/cloud.toml's [sagemaker], or none)
    )
    sagemaker_image_uri: str = ""

    def structural(self) -> tuple[object, ...]:
        """The fields that need a new service when they change (the rest is applied to the running one)."""
        return (self.home, self.models_dirs, self.lora_dir, self.gpus)


def _sagemaker(config: HostConfig) -> tuple[str, str]:
    return (config.sagemaker_role_arn, config.sagemaker_image_uri)


class HostRuntime:
    """Holds the TrainingService (and DatasetService) of this process and starts its scheduler thread once."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.service: TrainingService | None = None
        self.datasets: DatasetService | None = None
        self.config: HostConfig | None = None
        self.started = False

    def ensure(
        self,
        config: HostConfig,
        *,
        on_delivered: Callable[[Job, list[Path]], None] | None = None,
        before_local_start: Callable[[Job, str], None] | None = None,
        local_problem: Callable[[], str | None] | None = None,
    ) -> TrainingService:
        """The service for `config`: the current one (settings and hooks updated), or a new one if folders changed."""
        with self._lock:
            previous = self.config
            if self.service is None or self.config is None or self.config.structural() != config.structural():
                self._rebuild(config)
            if self.service is None:
                raise RuntimeError("Train Management's service could not be built")
            scheduler = self.service.scheduler
            scheduler.devices.update(local_devices(config.gpus, config.per_device))
            scheduler.keep_epochs = config.keep_epochs
            scheduler.stall_after_s = config.stall_after_s
            if previous is not None and previous.s3_prefix != config.s3_prefix:
                self.service.s3.use_setting(config.s3_prefix)
            if previous is not None and _sagemaker(previous) != _sagemaker(config):
                self._configure_sagemaker(config)
            self.set_python(config.python)
            scheduler.on_delivered = on_delivered
            scheduler.before_local_start = before_local_start
            self.service.local_problem = local_problem
            self.config = config
            return self.service

    def set_python(self, python: tuple[str, ...] | list[str] | None) -> None:
        """Point the local runner at the trainer's interpreter (it may become ready while the host runs)."""
        from kohya_backend.jobs.runner import LocalRunner

        # No lock: the scheduler thread calls this from a before-start hook while ensure() may hold the lock and
        # wait for that thread to stop; one attribute assignment needs none.
        service = self.service
        runner = service.scheduler.runners.get("local") if service is not None else None
        if isinstance(runner, LocalRunner) and python:
            runner.python = tuple(python)

    def _configure_sagemaker(self, config: HostConfig) -> None:
        """The SageMaker settings changed: the runner takes them (cleared ones fall back to HOME/cloud.toml)."""
        from kohya_backend.jobs.sagemaker import SageMakerRunner

        runner = self.service.scheduler.runners.get("sagemaker") if self.service is not None else None
        if isinstance(runner, SageMakerRunner):
            runner.configure(
                home_root=config.home,
                role_arn=config.sagemaker_role_arn or None,
                image_uri=config.sagemaker_image_uri or None,
            )

    def _rebuild(self, config: HostConfig) -> None:
        from kohya_backend.service.app import build_service
        from kohya_backend.service.datasets import DatasetService

        was_started = self.started
        if self.service is not None:
            log.info("Train Management: folders changed, restarting its scheduler on %s", config.home)
            self.service.scheduler.stop()
            self.started = False
        self.service = build_service(
            config.home,
            models_dirs=config.models_dirs,
            lora_dir=config.lora_dir,
            python=config.python,
            devices=local_devices(config.gpus, config.per_device),
            keep_epochs=config.keep_epochs,
            s3_uri=config.s3_prefix or None,
            sagemaker_role_arn=config.sagemaker_role_arn or None,
            sagemaker_image_uri=config.sagemaker_image_uri or None,
        )
        self.datasets = DatasetService(self.service.home, jobs=self.service.store)
        if was_started:
            self.start()

    def start(self) -> bool:
        """Start the scheduler thread unless it already runs; True when this call started it."""
        with self._lock:
            if self.service is None:
                raise RuntimeError("HostRuntime.start() before ensure(): there is no service to start")
            if self.started:
                return False
            self.service.scheduler.start()
            self.started = True
            return True

    def stop(self) -> None:
        """Stop the scheduler thread (trainers keep running; the next start re-attaches to them)."""
        with self._lock:
            if self.service is not None:
                self.service.scheduler.stop()
            self.started = False

    def reset(self) -> None:
        """Stop and forget the service (tests, or a host that shuts the extension down)."""
        with self._lock:
            self.stop()
            self.service = None
            self.datasets = None
            self.config = None


RUNTIME = HostRuntime()
