"""Hooks the WebUI lends the backend, built around its objects (passed in, duck-typed, never imported here).

- interrogate: the WebUI's captioner as `Path -> caption` for the dataset editor;
- before local start: unload the WebUI's model (when the setting is on) and refuse to start when the trainer's
  environment is not ready;
- on delivered: refresh the WebUI's Lora list so a finished LoRA shows without a restart.

The WebUI's queue lock serialises GPU work; hooks that touch the model hold it, so they never pull a model out
from under a running generation. The captioner (a gradio event) waits for it, bounded; the before-start hook runs
on the scheduler's thread and never waits: while the WebUI is busy the job stays queued and is tried again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kohya_backend.errors import TrainManagementError
from kohya_backend.jobs.scheduler import StartDeferred

if TYPE_CHECKING:
    from kohya_backend.jobs.store import Job

log = logging.getLogger(__name__)

UNLOAD_WAIT_S = 120.0
WAITING_PHASE = "waiting for the WebUI to finish generating"
INTERROGATE_WAIT_S = 600.0
_FAILED_CAPTION = "<error>"  # what the WebUI's interrogator returns when it fails


class Lock(Protocol):
    """What the hooks need of the WebUI's queue lock (a threading.Lock)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


@contextmanager
def _holding(lock: Lock | None, timeout_s: float) -> Iterator[bool]:
    """Hold `lock` for the block if it can be had within `timeout_s`; yields whether it is held."""
    if lock is None:
        yield True
        return
    held = lock.acquire(True, timeout_s)
    try:
        yield held
    finally:
        if held:
            lock.release()


def interrogate_hook(
    interrogator: Any, lock: Lock | None = None, *, wait_s: float = INTERROGATE_WAIT_S
) -> Callable[[Path], str] | None:
    """The WebUI's `interrogator.interrogate(PIL image) -> str` as `image file -> caption`; None without one."""
    if interrogator is None or not callable(getattr(interrogator, "interrogate", None)):
        return None

    def interrogate(path: Path) -> str:
        from PIL import Image

        with Image.open(path) as opened:
            image = opened.convert("RGB")
        with _holding(lock, wait_s) as held:
            if not held:
                raise TrainManagementError(
                    f"the WebUI stayed busy for {wait_s:.0f} s, so {Path(path).name} was not captioned",
                    "caption again when the current generation has finished",
                )
            caption = interrogator.interrogate(image)
        if not isinstance(caption, str) or caption.strip() in ("", _FAILED_CAPTION):
            raise TrainManagementError(
                f"the WebUI's interrogator returned no caption for {Path(path).name}",
                "see the WebUI's console for its error (its model may still be downloading)",
            )
        return caption.strip()

    return interrogate


def unload_before_start(
    enabled: Callable[[], bool],
    unload: Callable[[], None],
    lock: Lock | None = None,
    *,
    wait_s: float = UNLOAD_WAIT_S,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[Job, str], None]:
    """Before a local training: unload the WebUI's model when `enabled()` says so (read at each start).

    It never blocks the scheduler's thread: while the WebUI holds its queue lock (a generation), StartDeferred
    keeps the job queued in WAITING_PHASE and the scheduler asks again at its next tick; once the WebUI has been
    busy for `wait_s`, the training starts without unloading. A failed unload is logged and the training starts
    anyway: unloading only makes room, and the trainer reports an out-of-memory error itself.
    """
    busy_since: dict[str, float] = {}  # job id -> when it first found the WebUI busy

    def before(job: Job, device: str) -> None:
        now = clock()
        for stale in [k for k, t in busy_since.items() if now - t > 10 * wait_s]:
            del busy_since[stale]  # jobs cancelled while they waited
        if not enabled():
            busy_since.pop(job.id, None)
            return
        if lock is not None and not lock.acquire(False):
            if now - busy_since.setdefault(job.id, now) < wait_s:
                raise StartDeferred(WAITING_PHASE)
            busy_since.pop(job.id, None)
            log.warning(
                "job %s: the WebUI stayed busy for %.0f s; starting on %s without unloading its model",
                job.id, wait_s, device,
            )  # fmt: skip
            return
        busy_since.pop(job.id, None)
        try:
            unload()
            log.info("job %s: unloaded the WebUI's model before training on %s", job.id, device)
        except Exception:  # a WebUI without a loaded model, or another build's quirk: train anyway
            log.exception("job %s: could not unload the WebUI's model", job.id)
        finally:
            if lock is not None:
                lock.release()

    return before


TRAINER_HINT = (
    "restart the WebUI with network access so that the extension's install.py sets up the trainer's "
    "environment (see .venv-trainer/setup.log), or pass --train-python with an interpreter that has "
    "requirements-trainer.txt installed"
)
SKIP_INSTALL_HINT = (
    "the WebUI was started with --skip-install, so the extension's install.py never ran to set up the trainer's "
    "environment: start the WebUI once without --skip-install (with network access), or pass --train-python with "
    "an interpreter that has requirements-trainer.txt installed"
)


def trainer_hint(skip_install: bool) -> str:
    """How to get a trainer's environment: the real cause first (--skip-install keeps install.py from running)."""
    return SKIP_INSTALL_HINT if skip_install else TRAINER_HINT


def trainer_problem(
    resolve: Callable[[], tuple[list[str] | None, str | None]], hint: str
) -> Callable[[], str | None]:
    """Why local training is unavailable right now (the trainer's interpreter is missing) and what to do, or None:
    what the Training Instance Type list shows next to this machine."""

    def problem() -> str | None:
        python, why = resolve()
        return None if python is not None else f"{why}; {hint}"

    return problem


def use_trainer(
    resolve: Callable[[], tuple[list[str] | None, str | None]],
    apply: Callable[[list[str]], None],
    hint: str,
) -> Callable[[Job, str], None]:
    """Before a local training: find the trainer's interpreter now (`resolve` -> (command, why not)).

    With one, `apply` hands it to the runner (the environment may have become ready while the host ran);
    without one the job fails with the reason and `hint` instead of starting in an interpreter that lacks the
    trainer's packages.
    """

    def before(job: Job, device: str) -> None:
        python, problem = resolve()
        if python is None:
            raise TrainManagementError(f"job {job.id} cannot start on {device}: {problem}", hint)
        apply(python)

    return before


def chain(*hooks: Callable[[Job, str], None]) -> Callable[[Job, str], None]:
    """Run before-start hooks in order; the first that raises stops the start."""

    def before(job: Job, device: str) -> None:
        for hook in hooks:
            hook(job, device)

    return before


def refresh_loras(find_networks: Callable[[], Any]) -> Callable[[Job, list[Path]], None]:
    """After a delivery: `list_available_networks()` of the WebUI's Lora module, found at call time."""
    refresh_lock = threading.Lock()

    def on_delivered(job: Job, paths: list[Path]) -> None:
        networks = find_networks()
        refresh = getattr(networks, "list_available_networks", None)
        if not callable(refresh):
            log.info("job %s: no Lora list to refresh (the built-in Lora extension is not loaded)", job.id)
            return
        with refresh_lock:
            refresh()

    return on_delivered
